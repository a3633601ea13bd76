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
