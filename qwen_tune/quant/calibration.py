"""Calibration samples for GPTQ, read from text or from conversations rendered as training renders them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..data.formats import detect_file_format, read_records, to_conversation
from ..data.template import ChatMLEncoder
from ..data.tokenizer import encode_texts
from .format import GPTQError


def read_calibration(path: str | os.PathLike, tokenizer: Any, n_samples: int = 128, seq_len: int = 512,
                     ) -> list[torch.Tensor]:
    """Token id rows [1, <=seq_len] from a calibration file.

    ``.txt``: one sample per paragraph (blank-line separated; one per line if there are no blank lines).
    ``.json``/``.jsonl``: records with a ``text`` string, or conversations in any training format (Qwen/ShareGPT,
    OpenAI messages, Alpaca), rendered as ChatML exactly as training renders them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    rows: list[list[int]] = []
    if path.suffix in (".json", ".jsonl"):
        records = [r for r in read_records(path) if r.error is None]
        texts = [r.value["text"] for r in records if isinstance(r.value, dict) and isinstance(r.value.get("text"), str)]
        if texts:
            rows = encode_texts(tokenizer, texts[:n_samples])
        else:
            fmt = detect_file_format(records)
            convs = []
            for r in records:
                try:
                    convs.append(to_conversation(r, fmt))
                except ValueError:
                    continue
                if len(convs) >= n_samples:
                    break
            rows = [s.input_ids for s in ChatMLEncoder(tokenizer, max_len=seq_len).encode(convs)]
    else:
        text = path.read_text(encoding="utf-8")
        parts = [p.strip() for p in text.split("\n\n") if p.strip()]
        if len(parts) <= 1:
            parts = [ln.strip() for ln in text.splitlines() if ln.strip()]
        rows = encode_texts(tokenizer, parts[:n_samples])
    rows = [r[:seq_len] for r in rows if len(r) >= 2][:n_samples]
    if not rows:
        raise GPTQError(f"calibration file {path} yields no samples (need text of at least two tokens)")
    return [torch.tensor([r]) for r in rows]
