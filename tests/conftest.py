from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "data_examples"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tokenized-data cache and HF caches go to a temp dir: tests never read a developer's cache.
    os.environ["QWEN_TUNE_CACHE"] = str(tmp_path_factory.mktemp("qwen_tune_cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from qwen_tune.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def family_tok(family_dirs):
    """Each fixture family's tokenizer, loaded once (``family_tok("qwen3")``)."""
    from transformers import AutoTokenizer

    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = AutoTokenizer.from_pretrained(family_dirs[family])
        return cache[family]
    return get


def run_cli(*args: str) -> int:
    from qwen_tune.cli.main import main

    return main(list(args))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`cuda` tests skip cleanly without a CUDA device. QWEN_TUNE_CHECK_DEVICE=cpu (scripts/gpu_check.py --dry-run)
    runs their bodies on CPU with tiny shapes instead, so their logic cannot rot."""
    if os.environ.get("QWEN_TUNE_CHECK_DEVICE") == "cpu":
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.py on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


CHAT_TEMPLATES = ROOT / "tests" / "fixtures" / "chat_templates"
# Added tokens beyond <|endoftext|>/<|im_start|>/<|im_end|> each family's real tokenizer has (ids and special
# flags as in qwen3-thinking-2507/tokenizer_config.json): Qwen1.5/Qwen2 none, Qwen2.5 up to <|file_sep|>
# 151664, QwQ / Qwen3 up to </think> 151668. Qwen3.5 ships a new tokenizer not available here: its template is
# tested on the Qwen3 one.
FAMILY_VOCAB = {"qwen1.5-chat": 151646, "qwen2-instruct": 151646, "qwen2.5-instruct": 151665, "qwq-32b": 151669,
                "qwen3": 151669, "qwen3-instruct-2507": 151669, "qwen3-thinking-2507": 151669, "qwen3-coder": 151669,
                "qwen3.5": 151669}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tokenizer dir per fixture family, as its checkpoint ships it (tokenizer.json + its chat template).

    The 18 MB tokenizer.json is exported once per vocabulary size and hard-linked into each family's dir.
    """
    import json
    import shutil

    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from qwen_tune.data.tokenizer import export_qwen2_tokenizer

    root = tmp_path_factory.mktemp("families")
    added = json.loads((CHAT_TEMPLATES / "qwen3-thinking-2507" / "tokenizer_config.json").read_text())
    added = sorted((int(k), v) for k, v in added["added_tokens_decoder"].items() if int(k) >= 151646)
    vocab_dirs = {}
    for size in sorted(set(FAMILY_VOCAB.values())):
        d = root / f"vocab_{size}"
        if size == 151646:
            export_qwen2_tokenizer(d, chat_template=None)
        else:
            tok = AutoTokenizer.from_pretrained(vocab_dirs[151646])
            for idx, t in added:
                if idx < size:
                    tok.add_tokens([AddedToken(t["content"], special=t["special"], normalized=False)],
                                   special_tokens=t["special"])
                    assert tok.convert_tokens_to_ids(t["content"]) == idx
            tok.save_pretrained(d)
        vocab_dirs[size] = d
    out = {}
    for family, size in FAMILY_VOCAB.items():
        d = root / family
        shutil.copytree(vocab_dirs[size], d, copy_function=os.link)
        src = CHAT_TEMPLATES / family
        if (src / "tokenizer_config.json").exists():  # a whole real tokenizer_config.json
            os.unlink(d / "tokenizer_config.json")
            shutil.copy(src / "tokenizer_config.json", d / "tokenizer_config.json")
        else:
            shutil.copy(src / "chat_template.jinja", d / "chat_template.jinja")
        out[family] = d
    return out


@pytest.fixture
def mount_tmpfs(tmp_path: Path):
    """`mount_tmpfs(size_mb)` -> a directory on a fresh tmpfs of that size (a disk that fills up for real);
    skips where a tmpfs cannot be mounted (it needs root). Unmounted after the test."""
    import subprocess

    mounted: list[Path] = []

    def mount(size_mb: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        d = tmp_path / f"small_disk_{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)

