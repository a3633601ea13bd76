"""Writing a Qwen2-style fast tokenizer (``tokenizer.json`` & co.) built from ``qwen.tiktoken``: Qwen1.5+ use the
same BPE vocabulary, so its ids equal :class:`QWenTokenizer`'s on plain text (random-weight Qwen2 test models get it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken as RustAddedToken
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ...constants import ENDOFTEXT, ENDOFTEXT_ID, IM_END, IM_END_ID, IM_START, IM_START_ID
from .tiktoken_bpe import QWEN_PAT_STR, _load_bpe
from .tokenization_qwen import CHATML_TEMPLATE


def _qwen2_added_token(content: str, idx: int) -> dict[str, Any]:
    return {
        "id": idx,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def export_qwen2_tokenizer(
    out_dir: str | os.PathLike,
    *,
    eos_token: str = IM_END,
    chat_template: str | None = CHATML_TEMPLATE,
    model_max_length: int = 32768,
    vocab_file: str | os.PathLike | None = None,
) -> None:
    """Write a Qwen2-style HF fast tokenizer built from ``qwen.tiktoken`` into ``out_dir``.

    Files: ``tokenizer.json`` (byte-level BPE, NFC normalizer, Qwen pre-tokenizer regex, specials
    ``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645), ``vocab.json``, ``merges.txt`` and
    ``tokenizer_config.json`` (``tokenizer_class`` ``Qwen2Tokenizer``, ChatML ``chat_template``, pad
    ``<|endoftext|>``, EOS ``eos_token`` -- ``<|im_end|>`` as in Qwen1.5+ chat checkpoints, pass ``<|endoftext|>`` for a
    base model). ``AutoTokenizer.from_pretrained(out_dir)`` loads it; its ids equal :class:`QWenTokenizer`'s on
    ordinary text.
    """
    qwen2_specials = {ENDOFTEXT_ID: ENDOFTEXT, IM_START_ID: IM_START, IM_END_ID: IM_END}
    if eos_token not in qwen2_specials.values():
        raise ValueError(f"eos_token must be one of {sorted(qwen2_specials.values())}, got {eos_token!r}")
    bpe = _load_bpe(vocab_file)
    if len(bpe.ranks) != ENDOFTEXT_ID:
        raise ValueError(f"{bpe.path}: expected {ENDOFTEXT_ID} BPE ranks, found {len(bpe.ranks)}")
    vocab, merges = bpe.vocab_and_merges

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for idx in sorted(qwen2_specials):  # appended in id order: 151643, 151644, 151645
        backend.add_special_tokens(
            [RustAddedToken(qwen2_specials[idx], single_word=False, lstrip=False, rstrip=False, normalized=False)]
        )
    got = {tok: backend.token_to_id(tok) for tok in qwen2_specials.values()}
    if got != {tok: idx for idx, tok in qwen2_specials.items()}:
        raise RuntimeError(f"special token ids came out wrong: {got}")
    backend.save(str(out / "tokenizer.json"), pretty=False)

    with open(out / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(out / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{left} {right}\n" for left, right in merges)

    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(idx): {k: v for k, v in _qwen2_added_token(tok, idx).items() if k != "id"}
            for idx, tok in sorted(qwen2_specials.items())
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")
