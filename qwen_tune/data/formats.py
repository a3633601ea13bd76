"""Reading conversation data in the formats users already have, with located errors.

Every record becomes a :class:`Conversation` (an optional system prompt plus alternating
user/assistant turns). A bad record raises :class:`DataError` naming the file, the record
index (and id) and the field, so a user can fix their data instead of reading a traceback.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

Format = Literal["qwen", "sharegpt", "openai", "alpaca"]
FORMATS: tuple[str, ...] = ("qwen", "sharegpt", "openai", "alpaca")
DATA_SUFFIXES = (".json", ".jsonl")

# Role spellings of the conversation formats, mapped onto ChatML roles.
_ROLES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant",
    "system": "system",
}


@dataclass
class Conversation:
    id: str
    turns: list[tuple[str, str]]  # (role, text), role in {"user", "assistant"}
    system: str | None = None  # None: use the recipe's default system prompt
    dropped_leading_assistant: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "system": self.system,
                "roles": [r for r, _ in self.turns], "texts": [t for _, t in self.turns]}


@dataclass
class DataError(ValueError):
    """A record (or a whole file) that cannot be used, located precisely."""

    file: str
    reason: str  # short machine-friendly key, used for per-reason counts
    detail: str
    index: int | None = None  # 0-based record index (line index for JSONL)
    record_id: str | None = None
    field: str | None = None
    line: int | None = None

    def __post_init__(self) -> None:
        super().__init__(str(self))

    @property
    def location(self) -> str:
        loc = self.file
        if self.line is not None:
            loc += f":{self.line}"
        if self.index is not None:
            loc += f" record {self.index}"
        if self.record_id is not None:
            loc += f" (id={self.record_id!r})"
        if self.field is not None:
            loc += f" field `{self.field}`"
        return loc

    def __str__(self) -> str:
        return f"{self.location}: {self.detail}"


@dataclass
class RawRecord:
    """One record as read from disk, before validation."""

    file: str
    index: int
    value: Any = None
    error: DataError | None = None
    line: int | None = None


def list_data_files(path: str | os.PathLike) -> list[Path]:
    """A file, or every .json/.jsonl file under a directory (sorted, so order is stable)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in DATA_SUFFIXES and f.is_file())
        if not files:
            raise FileNotFoundError(f"{p}: directory holds no .json or .jsonl files")
        return files
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such data file or directory")
    return [p]


def read_records(path: str | os.PathLike) -> Iterator[RawRecord]:
    """Yield raw records of a JSON list or JSONL file.

    A JSONL line that fails to decode becomes a RawRecord with an error (the rest of the
    file is still read); a JSON list that fails to parse cannot be split into records, so
    that raises a DataError for the whole file.
    """
    path = Path(path)
    data = path.read_bytes()
    head = data.lstrip()[:1]
    if head == b"[" or (head == b"{" and path.suffix == ".json" and _is_single_json(data)):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise DataError(str(path), "not_utf8", f"invalid UTF-8 at byte {e.start} (line {line})", line=line) from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(str(path), "invalid_json", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                            line=e.lineno) from None
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            yield RawRecord(str(path), i, item)
        return
    # JSONL: one record per non-empty line, errors kept per line.
    index = 0
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            err = DataError(str(path), "not_utf8", f"invalid UTF-8 at byte {e.start} of the line", index=index, line=lineno)
            yield RawRecord(str(path), index, error=err, line=lineno)
            index += 1
            continue
        try:
            yield RawRecord(str(path), index, json.loads(text), line=lineno)
        except json.JSONDecodeError as e:
            err = DataError(str(path), "invalid_json", f"invalid JSON at column {e.colno}: {e.msg}", index=index, line=lineno)
            yield RawRecord(str(path), index, error=err, line=lineno)
        index += 1


def _is_single_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def detect_format(record: Any) -> Format | None:
    """Guess a record's format from its keys (None when nothing fits)."""
    if not isinstance(record, dict):
        return None
    if "conversations" in record:
        turns = record["conversations"]
        if isinstance(turns, list) and any(isinstance(t, dict) and t.get("from") in ("human", "gpt") for t in turns):
            return "sharegpt"
        return "qwen"
    if "messages" in record:
        return "openai"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def detect_file_format(records: Iterable[RawRecord], sample: int = 50) -> Format:
    """The format of a file: the majority vote over its first records."""
    votes: dict[str, int] = {}
    first_file = "<data>"
    for n, rec in enumerate(records):
        first_file = rec.file
        if n >= sample:
            break
        fmt = detect_format(rec.value) if rec.error is None else None
        if fmt:
            votes[fmt] = votes.get(fmt, 0) + 1
    if not votes:
        raise DataError(first_file, "unknown_format",
                        "cannot detect the data format: expected records with `conversations` (Qwen/ShareGPT), "
                        "`messages` (OpenAI) or `instruction`/`output` (Alpaca); set data.format to force one")
    return max(votes, key=votes.__getitem__)  # type: ignore[return-value]


def to_conversation(rec: RawRecord, fmt: Format) -> Conversation:
    """Validate one raw record and turn it into a Conversation, or raise a located DataError."""
    if rec.error is not None:
        raise rec.error
    value = rec.value

    def err(reason: str, detail: str, fld: str | None = None) -> DataError:
        rid = value.get("id") if isinstance(value, dict) else None
        return DataError(rec.file, reason, detail, index=rec.index, record_id=None if rid is None else str(rid),
                         field=fld, line=rec.line)

    if not isinstance(value, dict):
        raise err("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    rid = str(value.get("id", f"{Path(rec.file).stem}-{rec.index}"))
    if fmt == "alpaca":
        turns = _alpaca_turns(value, err)
    else:
        key, role_key, text_key = ("messages", "role", "content") if fmt == "openai" else ("conversations", "from", "value")
        if key not in value:
            raise err("missing_field", f"missing `{key}` (expected {fmt} format)", key)
        raw_turns = value[key]
        if not isinstance(raw_turns, list):
            raise err("wrong_type", f"`{key}` must be a list of turns, got {type(raw_turns).__name__}", key)
        turns = []
        for j, t in enumerate(raw_turns):
            where = f"{key}[{j}]"
            if not isinstance(t, dict):
                raise err("wrong_type", f"a turn must be an object, got {type(t).__name__}", where)
            if role_key not in t:
                raise err("missing_field", f"turn has no `{role_key}`", f"{where}.{role_key}")
            role = _ROLES.get(t[role_key]) if isinstance(t[role_key], str) else None
            if role is None:
                raise err("unknown_role", f"unknown role {t[role_key]!r} (expected one of {sorted(_ROLES)})",
                          f"{where}.{role_key}")
            if text_key not in t:
                raise err("missing_field", f"turn has no `{text_key}`", f"{where}.{text_key}")
            text = t[text_key]
            if not isinstance(text, str):
                raise err("non_string_value", f"`{text_key}` must be a string, got {type(text).__name__}",
                          f"{where}.{text_key}")
            turns.append((role, text))
    return _check_turns(rid, turns, err, "messages" if fmt == "openai" else "conversations")


def _alpaca_turns(value: dict, err) -> list[tuple[str, str]]:
    for k in ("instruction", "output"):
        if k not in value:
            raise err("missing_field", f"missing `{k}` (expected alpaca format)", k)
    for k in ("instruction", "input", "output", "system"):
        if k in value and value[k] is not None and not isinstance(value[k], str):
            raise err("non_string_value", f"`{k}` must be a string, got {type(value[k]).__name__}", k)
    prompt = value["instruction"]
    if value.get("input"):
        prompt = f"{prompt}\n\n{value['input']}"
    turns = [("user", prompt), ("assistant", value["output"])]
    if value.get("system"):
        turns.insert(0, ("system", value["system"]))
    return turns


def _check_turns(rid: str, turns: list[tuple[str, str]], err, key: str) -> Conversation:
    if not turns:
        raise err("empty_conversation", "conversation has no turns", key)
    system = None
    if turns[0][0] == "system":
        system = turns[0][1]
        turns = turns[1:]
    for j, (role, _) in enumerate(turns):
        if role == "system":
            raise err("misplaced_system", "a system turn is only allowed as the first turn", f"{key}[{j + (system is not None)}]")
    dropped = False
    # The reference finetune drops a leading non-user turn; do the same, but count it.
    if turns and turns[0][0] != "user":
        turns = turns[1:]
        dropped = True
    if not any(role == "assistant" for role, _ in turns):
        raise err("no_assistant_turn", "conversation has no assistant turn to learn from", key)
    return Conversation(rid, list(turns), system, dropped)
