"""Preference pairs: reading the common layouts with located errors, and rendering them with the SFT template.

A pair is one prompt conversation (optional system, then user/assistant turns ending on a user turn) and two
assistant replies, `chosen` and `rejected`. Accepted layouts (detected per file, or forced with data.format):

* ``trl``: TRL's ``prompt`` / ``chosen`` / ``rejected``, each a message list (``role`` / ``content``) or a string
  (a string prompt is one user turn); without ``prompt``, ``chosen`` and ``rejected`` are whole conversations and
  the prompt is their common leading messages (TRL's implicit prompt);
* ``sharegpt``: LLaMA-Factory's ``conversations`` (``from`` / ``value``) plus ``chosen`` / ``rejected`` replies
  (a turn object or a string), with optional ``system``;
* ``alpaca``: LLaMA-Factory's ``instruction`` / ``input`` plus ``chosen`` / ``rejected`` strings.

Each side is rendered by the SFT encoder factory (``make_encoder``: the checkpoint's own chat template for
Qwen1.5 ... Qwen3.5, Qwen-1's reference ChatML otherwise, with data.template / data.enable_thinking /
data.chat_template_kwargs) as the prompt conversation plus that reply, with assistant-only labels, and split
where the reply's labels start: prompt ids, then the reply's ids (so a Qwen3 reply carries the template's
``<think>`` block of the last turn, as TRL's prompt / completion split of apply_chat_template does). The template
code stays the single place that knows the chat format. Tokenized pairs are cached on disk like SFT data.
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import datasets

from ..config import DataConfig, DatasetSpec
from .chat_template import make_encoder
from .dataset import PreparedData, _save_cache, cached_data, iter_raw_records, mix, validate_records
from .formats import Conversation, DataError, RawRecord, record_locator, to_conversation
from .report import DataReport
from .template import IGNORE_INDEX

log = logging.getLogger(__name__)
PairFormat = Literal["trl", "sharegpt", "alpaca"]
PAIR_FORMATS: tuple[str, ...] = ("trl", "sharegpt", "alpaca")
PAIR_COLUMNS = ["id", "prompt_ids", "chosen_ids", "rejected_ids", "length"]
PAIRS_VERSION = "pairs-1"  # bump when the pair rendering changes: part of the cache key
# SFT format names a user may have set in data.format, read as the pair layout they correspond to.
_FORMAT_ALIASES = {"openai": "trl", "qwen": "sharegpt"}


@dataclass
class Pair:
    id: str
    prompt: list[tuple[str, str]]  # (role, text) turns, ending on a user turn
    chosen: str
    rejected: str
    system: str | None = None
    dropped_leading_assistant: bool = False

    def conversation(self, side: str) -> Conversation:
        reply = self.chosen if side == "chosen" else self.rejected
        return Conversation(f"{self.id}/{side}", self.prompt + [("assistant", reply)], self.system)


def detect_pair_format(record: Any) -> PairFormat | None:
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        return None
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    return "trl"


def detect_pair_file_format(spec: DatasetSpec, sample: int = 50) -> PairFormat:
    votes: dict[str, int] = {}
    first = spec.path
    for n, rec in enumerate(iter_raw_records(spec)):
        first = rec.file
        if n >= sample:
            break
        fmt = detect_pair_format(rec.value) if rec.error is None else None
        if fmt:
            votes[fmt] = votes.get(fmt, 0) + 1
    if not votes:
        raise DataError(first, "unknown_format",
                        "cannot detect a preference-pair format: expected records with `chosen` and `rejected` "
                        "(plus `prompt` (TRL), `conversations` (LLaMA-Factory sharegpt) or `instruction` (alpaca))")
    return max(votes, key=votes.__getitem__)  # type: ignore[return-value]


def _reply_text(value: Any, key: str, err: Callable[..., DataError]) -> str:
    """A reply given as a string, a turn object, or a list holding exactly one assistant turn."""
    where = key
    if isinstance(value, list):
        if len(value) != 1:
            raise err("wrong_type", f"`{key}` must hold exactly one assistant reply, got {len(value)} messages", key)
        value, where = value[0], f"{key}[0]"
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise err("wrong_type", f"a reply must be a string or a turn object, got {type(value).__name__}", where)
    role_key, text_key = ("from", "value") if "from" in value else ("role", "content")
    if value.get(role_key) not in ("assistant", "gpt"):
        raise err("unknown_role", f"a reply must come from the assistant, got {value.get(role_key)!r}",
                  f"{where}.{role_key}")
    if not isinstance(value.get(text_key), str):
        raise err("non_string_value" if text_key in value else "missing_field",
                  f"`{text_key}` must be a string", f"{where}.{text_key}")
    return value[text_key]


def _renamed(e: DataError, old: str, new: str) -> DataError:
    if e.field is not None:
        e.field = re.sub(rf"^{re.escape(old)}\b", new, e.field)
        e.args = (str(e),)
    return e


def _prompt_conversation(rec: RawRecord, key: str, turns: list[Any], fmt: str, reply: str) -> Conversation:
    """Validate prompt turns through the SFT reader (the same checks and error texts), with the reply appended."""
    role_key, text_key, sft_fmt = ("from", "value", "sharegpt") if fmt == "sharegpt" else ("role", "content", "openai")
    sft_key = "conversations" if sft_fmt == "sharegpt" else "messages"
    value = {sft_key: list(turns) + [{role_key: "assistant", text_key: reply}]}
    if isinstance(rec.value, dict) and "id" in rec.value:
        value["id"] = rec.value["id"]
    try:
        return to_conversation(RawRecord(rec.file, rec.index, value, line=rec.line), sft_fmt)  # type: ignore[arg-type]
    except DataError as e:
        raise _renamed(e, sft_key, key) from None


def to_pair(rec: RawRecord, fmt: PairFormat) -> Pair:
    """Validate one raw record into a Pair, or raise a DataError naming file, record and field."""
    err = record_locator(rec)
    value = rec.value
    for k in ("chosen", "rejected"):
        if k not in value:
            raise err("missing_field", f"missing `{k}` (a preference pair needs `chosen` and `rejected`)", k)
    rid = str(value.get("id", f"{Path(rec.file).stem}-{rec.index}"))

    if fmt == "trl" and "prompt" not in value:
        # Implicit prompt: two whole conversations sharing their leading messages.
        sides = {}
        for k in ("chosen", "rejected"):
            if not isinstance(value[k], list):
                raise err("wrong_type", f"without `prompt`, `{k}` must be a message list", k)
            conv = _prompt_conversation(rec, k, value[k], "trl", "")
            sides[k] = conv
            if conv.turns[-2][0] != "assistant":  # _prompt_conversation appended one empty reply
                raise err("no_assistant_turn", f"`{k}` must end with an assistant reply", k)
        c, r = sides["chosen"], sides["rejected"]
        prompt_c, prompt_r = c.turns[:-2], r.turns[:-2]
        if prompt_c != prompt_r or c.system != r.system:
            raise err("prompt_mismatch", "`chosen` and `rejected` must share every message but the last "
                      "(or give the prompt in `prompt`)", "rejected")
        if not prompt_c or prompt_c[-1][0] != "user":
            raise err("no_user_turn", "the prompt must end with a user turn", "chosen")
        return Pair(rid, prompt_c, c.turns[-2][1], r.turns[-2][1], c.system, c.dropped_leading_assistant)

    chosen = _reply_text(value["chosen"], "chosen", err)
    rejected = _reply_text(value["rejected"], "rejected", err)
    system = value.get("system")
    if system is not None and not isinstance(system, str):
        raise err("non_string_value", f"`system` must be a string, got {type(system).__name__}", "system")
    if fmt == "alpaca":
        if "instruction" not in value:
            raise err("missing_field", "missing `instruction` (expected alpaca preference format)", "instruction")
        for k in ("instruction", "input"):
            if k in value and value[k] is not None and not isinstance(value[k], str):
                raise err("non_string_value", f"`{k}` must be a string, got {type(value[k]).__name__}", k)
        prompt = value["instruction"] + (f"\n\n{value['input']}" if value.get("input") else "")
        return Pair(rid, [("user", prompt)], chosen, rejected, system or None)
    key = "conversations" if fmt == "sharegpt" else "prompt"
    if key not in value:
        raise err("missing_field", f"missing `{key}` (expected {fmt} preference format)", key)
    turns = value[key]
    if isinstance(turns, str):
        turns = [{"role": "user", "content": turns}] if fmt == "trl" else turns
    if not isinstance(turns, list):
        raise err("wrong_type", f"`{key}` must be a list of turns, got {type(turns).__name__}", key)
    conv = _prompt_conversation(rec, key, turns, fmt, chosen)
    prompt = conv.turns[:-1]
    if not prompt or prompt[-1][0] != "user":
        raise err("no_user_turn", "the prompt must end with a user turn", key)
    return Pair(rid, prompt, chosen, rejected, system if system is not None else conv.system,
                conv.dropped_leading_assistant)


def load_pairs(spec: DatasetSpec, report: DataReport, strict: bool = False) -> list[Pair]:
    fmt = _FORMAT_ALIASES.get(spec.format, spec.format)
    if fmt == "auto":
        fmt = detect_pair_file_format(spec)
    elif fmt not in PAIR_FORMATS:
        raise DataError(spec.path, "unknown_format", f"data.format={spec.format!r} is not a preference-pair "
                        f"format: use auto, {', '.join(PAIR_FORMATS)}")
    return validate_records(spec, lambda rec: to_pair(rec, fmt), report, strict)  # type: ignore[arg-type]


class PairEncoder:
    """Pairs -> TRL's tokenized columns (prompt_ids, chosen_ids, rejected_ids) through the SFT template encoder."""

    def __init__(self, tokenizer: Any, max_len: int, system_prompt: str | None = None, truncation: str = "cut", *,
                 template: str = "auto", template_kwargs: dict[str, Any] | None = None) -> None:
        # The encoder never truncates here: a pair is cut reply-side below so the prompt stays whole. Labels are
        # always assistant-only: the reply is the last labeled span, whatever data.mask says for SFT.
        self.encoder = make_encoder(tokenizer, 1 << 30, template=template, mask="assistant_only",
                                    system_prompt=system_prompt, truncation="cut", template_kwargs=template_kwargs)
        self.name, self.template_id = self.encoder.name, self.encoder.template_id
        self.max_len = max_len
        self.truncation = truncation

    @staticmethod
    def _split(input_ids: list[int], labels: list[int]) -> int:
        """Where the last assistant reply starts: the start of the last run of labeled tokens."""
        end = len(labels)
        while end > 0 and labels[end - 1] == IGNORE_INDEX:
            end -= 1
        start = end
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        return start

    def encode(self, pairs: list[Pair], report: DataReport) -> list[dict[str, Any]]:
        convs = [c for p in pairs for c in (p.conversation("chosen"), p.conversation("rejected"))]
        encoded = self.encoder.encode(convs)
        report.template = self.name
        rows = []
        for i, pair in enumerate(pairs):
            failed = next((e.drop_reason for e in encoded[2 * i: 2 * i + 2] if e.drop_reason), None)
            if failed:  # the template cannot render one side (template_error / template_mismatch / ...)
                report.add_drop(failed, f"id={pair.id!r}")
                continue
            for e in encoded[2 * i: 2 * i + 2]:
                report.ignored.update(e.notes)
            sides = []
            for e in encoded[2 * i: 2 * i + 2]:
                cut = self._split(e.input_ids, e.labels)
                sides.append((e.input_ids[:cut], e.input_ids[cut:]))
            (prompt, chosen), (prompt_r, rejected) = sides
            if prompt != prompt_r:  # cannot happen with a template that renders turns independently
                report.add_drop("prompt_mismatch", f"id={pair.id!r}")
                continue
            if chosen == rejected:
                report.add_drop("identical_pair", f"id={pair.id!r}")  # zero gradient: a data bug, not a sample
                continue
            room = self.max_len - len(prompt)
            if len(prompt) + max(len(chosen), len(rejected)) > self.max_len:
                if self.truncation == "drop":
                    report.add_drop("too_long", f"id={pair.id!r}")
                    continue
                if room < 1:
                    report.add_drop("prompt_too_long", f"id={pair.id!r}")
                    continue
                chosen, rejected = chosen[:room], rejected[:room]
                report.truncated += 1
                if chosen == rejected:
                    report.add_drop("identical_pair", f"id={pair.id!r} (after truncation)")
                    continue
            rows.append({"id": pair.id, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
                         "length": len(prompt) + max(len(chosen), len(rejected))})
        report.kept += len(rows)
        return rows


def _to_dataset(rows: list[dict[str, Any]]) -> datasets.Dataset:
    if rows:
        return datasets.Dataset.from_list(rows).select_columns(PAIR_COLUMNS)
    return datasets.Dataset.from_dict({c: [] for c in PAIR_COLUMNS})


def prepare_pairs(cfg: DataConfig, tokenizer: Any, seed: int = 42, use_cache: bool = True) -> PreparedData:
    """Data specs of a dpo recipe -> tokenized pair datasets, with a report of everything skipped or cut."""
    if not cfg.datasets:
        raise DataError("<recipe>", "no_data", "no training data: set data.path or data.datasets")
    if cfg.streaming:
        raise DataError("<recipe>", "unsupported", "data.streaming is not supported for preference pairs")
    encoder = PairEncoder(tokenizer, cfg.max_len, cfg.system_prompt, cfg.truncation, template=cfg.template,
                          template_kwargs=cfg.template_kwargs)
    log.info("data: preference pairs rendered with %s", encoder.name)
    cached, hit = cached_data(cfg, tokenizer, seed, f"{PAIRS_VERSION}:{encoder.template_id}", use_cache)
    if hit is not None:
        return hit
    train_report = DataReport("train")
    train_pairs = mix([(s, load_pairs(s, train_report, cfg.strict)) for s in cfg.datasets], seed)
    reports = [train_report]
    eval_pairs: list[Pair] = []
    if cfg.eval_datasets:
        reports.append(DataReport("eval"))
        eval_pairs = mix([(s, load_pairs(s, reports[1], cfg.strict)) for s in cfg.eval_datasets], seed)
    elif cfg.eval_split_ratio > 0 and len(train_pairs) > 1:
        random.Random(seed).shuffle(train_pairs)
        n_eval = max(1, math.floor(len(train_pairs) * cfg.eval_split_ratio))
        eval_pairs, train_pairs = train_pairs[:n_eval], train_pairs[n_eval:]
        reports.append(DataReport("eval"))
    train = _to_dataset(encoder.encode(train_pairs, train_report))
    eval_ds = _to_dataset(encoder.encode(eval_pairs, reports[1])) if len(reports) > 1 else None
    if len(train) == 0:
        raise DataError(", ".join(s.path for s in cfg.datasets), "no_samples",
                        "no usable preference pair left:\n" + str(train_report))
    if use_cache:
        _save_cache(cached, train, eval_ds, reports)
    return PreparedData(train, eval_ds, reports, cached if use_cache else None, False)
