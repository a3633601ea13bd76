"""The peer benchmark's inputs: one tiny Qwen2 checkpoint and the same conversations in each toolkit's format.

Every toolkit gets the same turns with the system prompt written out (so no template's default system prompt
applies), which renders to the same ChatML text and so the same tokens under the Qwen2 tokenizer: the real
(non-pad) token count the benchmark divides by is counted once, here, from the checkpoint's own chat template.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from make_data import load_bench_data

SYSTEM = "You are a helpful assistant."
MODEL = dict(vocab_size=151936, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
             rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=False)


def pick_records(records: list[dict], n: int, lengths: list[int], seed: int) -> list[dict]:
    """n records whose length mix matches the whole set: one per length quantile, then shuffled (as bench_train)."""
    order = sorted(range(len(records)), key=lambda i: (lengths[i], i))
    picked = [order[min(len(order) - 1, int((k + 0.5) * len(order) / n))] for k in range(n)]
    random.Random(seed).shuffle(picked)
    return [records[i] for i in picked]


def to_messages(rec: dict) -> list[dict[str, str]]:
    """Qwen `conversations` (from/value) -> OpenAI messages with the system prompt written out."""
    return [{"role": "system", "content": SYSTEM}] + [
        {"role": t["from"], "content": t["value"]} for t in rec["conversations"]]


def formats(records: list[dict]) -> dict[str, Any]:
    """Each toolkit's file content, all holding the same conversations.

    * ``openai``: ``[{"messages": [...]}]`` (qwen-tune, LLaMA-Factory via dataset_info tags, torchtune's
      ``conversation_style: openai``);
    * ``openai_jsonl``: the same, one record per line (axolotl's ``chat_template`` dataset type);
    * ``sharegpt``: ``[{"system": ..., "conversations": [{"from": "human"|"gpt", "value": ...}]}]`` (LLaMA-Factory's
      default ShareGPT tags; kept as a cross-check of the conversion).
    """
    msgs = [to_messages(r) for r in records]
    sharegpt = [{"system": SYSTEM, "conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]],
                                                       "value": m["content"]} for m in ms[1:]]} for ms in msgs]
    return {"openai": [{"messages": ms} for ms in msgs],
            "openai_jsonl": "".join(json.dumps({"messages": ms}, ensure_ascii=False) + "\n" for ms in msgs),
            "sharegpt": sharegpt}


def messages_of(fmt: str, content: Any) -> list[list[dict[str, str]]]:
    """Back from a format's content to OpenAI messages (what each toolkit's loader reads out of it)."""
    if fmt == "openai":
        return [r["messages"] for r in content]
    if fmt == "openai_jsonl":
        return [json.loads(line)["messages"] for line in content.splitlines() if line.strip()]
    if fmt == "sharegpt":
        return [[{"role": "system", "content": r["system"]}] +
                [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                 for t in r["conversations"]] for r in content]
    raise ValueError(fmt)


def chatml_lengths(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[int]:
    """Tokens of each conversation as the model sees it (the checkpoint's ChatML template, no generation prompt)."""
    out = []
    for ms in conversations:
        ids = tokenizer.apply_chat_template(ms, tokenize=True, add_generation_prompt=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        out.append(len(ids))
    return out


def write_checkpoint(out: Path, seed: int = 0) -> None:
    """The tiny random Qwen2 (fixed seed) with the real Qwen2 tokenizer files (vocab.json/merges.txt included)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_tune.models.qwen1.convert_tokenizer import export_qwen2_tokenizer

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**MODEL))
    model.save_pretrained(out, safe_serialization=True)
    export_qwen2_tokenizer(out)


def prepare(work: Path, n: int = 24, seed: int = 0) -> dict[str, Any]:
    """Checkpoint + data files under `work`; returns the token counts (written to work/inputs.json)."""
    from qwen_tune.data.formats import RawRecord, to_conversation
    from qwen_tune.data.template import ChatMLEncoder
    from qwen_tune.data.tokenizer import load_tokenizer
    from transformers import AutoTokenizer

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "model"
    if not (ckpt / "model.safetensors").exists():
        write_checkpoint(ckpt, seed)
    all_records = load_bench_data()
    qtok = load_tokenizer(None)
    convs = [to_conversation(RawRecord("bench", i, r), "qwen") for i, r in enumerate(all_records)]
    all_lengths = [len(s.input_ids) for s in ChatMLEncoder(qtok, 1 << 30).encode(convs)]
    records = pick_records(all_records, n, all_lengths, seed)
    content = formats(records)
    (work / "data.json").write_text(json.dumps(content["openai"], ensure_ascii=False, indent=0), encoding="utf-8")
    (work / "data.jsonl").write_text(content["openai_jsonl"], encoding="utf-8")
    (work / "data_sharegpt.json").write_text(json.dumps(content["sharegpt"], ensure_ascii=False, indent=0),
                                             encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(ckpt)
    per_format = {f: sum(chatml_lengths(tok, messages_of(f, c))) for f, c in content.items()}
    lengths = chatml_lengths(tok, messages_of("openai", content["openai"]))
    info = {"conversations": len(records), "ids": [r["id"] for r in records], "lengths": lengths,
            "real_tokens": sum(lengths), "real_tokens_per_format": per_format, "max_len": max(lengths)}
    (work / "inputs.json").write_text(json.dumps(info, indent=1))
    return info
