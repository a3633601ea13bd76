"""Shared helpers for the benchmarks: machine info, the reference preprocess, tables, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"
ROOT = HERE.parent

IGNORE_TOKEN_ID = -100
DEFAULT_SYSTEM = "You are a helpful assistant."


# --------------------------------------------------------------------------- machine info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import numpy
    import tiktoken
    import torch
    import transformers

    try:
        import peft

        peft_v = peft.__version__
    except ImportError:  # pragma: no cover
        peft_v = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):  # pragma: no cover
        mem_gb = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": affinity,
        "torch_threads": torch.get_num_threads(),
        "mem_gb": mem_gb,
        "loadavg_at_start": load,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_v,
        "tiktoken": getattr(tiktoken, "__version__", None),
        "numpy": numpy.__version__,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }


def machine_line(info: dict[str, Any]) -> str:
    return (f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), {info['mem_gb']} GB RAM, "
            f"load avg at start {info['loadavg_at_start']}; Python {info['python']}, torch {info['torch']}, "
            f"transformers {info['transformers']}, peft {info['peft']}, tiktoken {info['tiktoken']}; {info['date']}")


# --------------------------------------------------------------------------- the reference preprocess


def reference_preprocess(sources: Sequence[list[dict]], tokenizer: Any, max_len: int,
                         system_message: str = DEFAULT_SYSTEM, pad: bool = True) -> dict[str, Any]:
    """Qwen's finetune.py ``preprocess()``, transcribed line by line (same as tests/test_template.py's oracle).

    Every piece goes through ``tokenizer(text).input_ids`` (the HF ``__call__`` path, as in the reference), and
    every sample is padded to ``max_len`` (``pad=False`` returns the unpadded lists, for parity checks).
    """
    import torch

    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}

    im_start = tokenizer.im_start_id
    im_end = tokenizer.im_end_id
    nl_tokens = tokenizer("\n").input_ids
    _system = tokenizer("system").input_ids + nl_tokens
    _user = tokenizer("user").input_ids + nl_tokens  # noqa: F841 - kept: the reference computes it
    _assistant = tokenizer("assistant").input_ids + nl_tokens  # noqa: F841

    # Apply prompt templates
    input_ids, targets = [], []
    for i, source in enumerate(sources):
        if roles[source[0]["from"]] != roles["user"]:
            source = source[1:]

        input_id, target = [], []
        system = [im_start] + _system + tokenizer(system_message).input_ids + [im_end] + nl_tokens
        input_id += system
        target += [im_start] + [IGNORE_TOKEN_ID] * (len(system) - 3) + [im_end] + nl_tokens
        assert len(input_id) == len(target)
        for j, sentence in enumerate(source):
            role = roles[sentence["from"]]
            _input_id = tokenizer(role).input_ids + nl_tokens + \
                tokenizer(sentence["value"]).input_ids + [im_end] + nl_tokens
            input_id += _input_id
            if role == "<|im_start|>user":
                _target = [im_start] + [IGNORE_TOKEN_ID] * (len(_input_id) - 3) + [im_end] + nl_tokens
            elif role == "<|im_start|>assistant":
                _target = [im_start] + [IGNORE_TOKEN_ID] * len(tokenizer(role).input_ids) + \
                    _input_id[len(tokenizer(role).input_ids) + 1:-2] + [im_end] + nl_tokens
            else:
                raise NotImplementedError
            target += _target
        assert len(input_id) == len(target)
        if pad:
            input_id += [tokenizer.pad_token_id] * (max_len - len(input_id))
            target += [IGNORE_TOKEN_ID] * (max_len - len(target))
        input_ids.append(input_id[:max_len])
        targets.append(target[:max_len])
    if not pad:
        return dict(input_ids=input_ids, labels=targets)
    input_ids = torch.tensor(input_ids, dtype=torch.int)
    targets = torch.tensor(targets, dtype=torch.int)

    return dict(
        input_ids=input_ids,
        labels=targets,
        attention_mask=input_ids.ne(tokenizer.pad_token_id),
    )


# --------------------------------------------------------------------------- output


def fmt(x: Any, nd: int = 1) -> str:
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{nd}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> tuple[str, str]:
    """(plain-text table for the terminal, markdown table)."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    md = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines), "\n".join(md)


def write_results(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    j = RESULTS / f"{name}.json"
    m = RESULTS / f"{name}.md"
    j.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    m.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return j, m
