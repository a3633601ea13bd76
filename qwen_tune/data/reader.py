"""Reading data files into raw records: JSON lists, single JSON objects and JSONL, each error located.

Hostile files must cost one located line, never a traceback or the file's other records: a UTF-8 BOM is
skipped, a record nested deeper than the parser's recursion limit or holding an integer past Python's digit
limit becomes an error for that record alone, and a JSON list is decoded item by item for the same reason.
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

DATA_SUFFIXES = (".json", ".jsonl")
_DECODER = json.JSONDecoder()
_WS = " \t\n\r"


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

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "index": self.index, "id": self.record_id,
                "field": self.field, "reason": self.reason, "detail": self.detail}


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


def loads(text: str) -> Any:
    """json.loads whose hostile-input failures are all ValueError (RecursionError is not one)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested deeper than the JSON parser allows") from None


def _why(e: BaseException) -> tuple[str, str]:
    if isinstance(e, RecursionError):
        return "too_deep", "nested deeper than the JSON parser allows"
    if isinstance(e, json.JSONDecodeError):
        return "invalid_json", f"invalid JSON at column {e.colno}: {e.msg}"
    return "invalid_json", f"invalid JSON: {str(e)[:120]}"  # e.g. an integer past Python's digit limit


def read_records(path: str | os.PathLike) -> Iterator[RawRecord]:
    """Yield raw records of a JSON list, a single JSON object or a JSONL file.

    A record that fails to decode becomes a RawRecord with an error (the rest of the file is still read); a JSON
    list whose syntax breaks cannot be split into records, so that raises a DataError for the whole file.
    """
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):  # Windows editors write one; json.loads refuses it
        data = data[len(codecs.BOM_UTF8):]
    if not data.strip():
        raise DataError(str(path), "empty_file", "the file is empty (no records)")
    if _is_json_document(data, path):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise DataError(str(path), "not_utf8", f"invalid UTF-8 at byte {e.start} (line {line})", line=line) from None
        n = 0
        for n, rec in enumerate(_json_items(text, str(path)), start=1):
            yield rec
        if n == 0:
            raise DataError(str(path), "empty_file", "the JSON list is empty (no records)")
        return
    yield from _jsonl_records(data, str(path))


def _is_json_document(data: bytes, path: Path) -> bool:
    """Whether the file is one JSON document (a list or an object) rather than JSONL.

    `.jsonl` is JSONL whenever its first line decodes on its own (so a first record that is an array stays one
    record); a pretty-printed list misnamed .jsonl is still read as a list.
    """
    head = data.lstrip()[:1]
    if head not in (b"[", b"{"):
        return False
    first = data.lstrip().split(b"\n", 1)[0]
    if path.suffix == ".jsonl" and _decodes(first):
        return False
    try:
        json.loads(data)
        return True
    except json.JSONDecodeError as e:
        # "Extra data": several documents, i.e. JSONL; anything else in a list is a broken list.
        return head == b"[" and e.msg != "Extra data"
    except (ValueError, RecursionError):
        # Decodes but for a record's depth or digits (located per record below), unless more follows the list.
        # latin-1 keeps byte offsets, and UTF-8 continuation bytes never look like JSON punctuation.
        text = data.decode("latin-1")
        start = _skip_ws(text, 0)
        return head == b"[" and not text[_skip_value(text, start):].strip(_WS)


def _decodes(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except (ValueError, RecursionError):
        return False


def _json_items(text: str, file: str) -> Iterator[RawRecord]:
    """Items of a JSON list (or the one object), decoded one at a time so one bad item costs only itself."""
    pos = _skip_ws(text, 0)
    if text[pos] == "{":
        yield _item(text, pos, 0, file)[0]
        return
    pos = _skip_ws(text, pos + 1)
    index = 0
    while pos < len(text) and text[pos] != "]":
        rec, pos = _item(text, pos, index, file)
        yield rec
        index += 1
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)


def _item(text: str, pos: int, index: int, file: str) -> tuple[RawRecord, int]:
    line = text.count("\n", 0, pos) + 1
    try:
        value, end = _DECODER.raw_decode(text, pos)
        return RawRecord(file, index, value, line=line), end
    except (ValueError, RecursionError) as e:
        if isinstance(e, json.JSONDecodeError):  # the file parsed as a whole, so this cannot be a syntax error
            raise DataError(file, "invalid_json", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                            line=e.lineno) from None
        reason, detail = _why(e)
        err = DataError(file, reason, detail, index=index, line=line)
        return RawRecord(file, index, error=err, line=line), _skip_value(text, pos)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _skip_value(text: str, pos: int) -> int:
    """End of the (syntactically valid) JSON value at `pos`, found without recursion."""
    depth, i, n = 0, pos, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth <= 0:
                return i + 1 if depth == 0 else i
        elif c == "," and depth == 0:
            return i
        i += 1
    return n


def _jsonl_records(data: bytes, file: str) -> Iterator[RawRecord]:
    """One record per non-empty line, errors kept per line."""
    index = 0
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            err = DataError(file, "not_utf8", f"invalid UTF-8 at byte {e.start} of the line", index=index, line=lineno)
            yield RawRecord(file, index, error=err, line=lineno)
            index += 1
            continue
        try:
            yield RawRecord(file, index, json.loads(text), line=lineno)
        except (ValueError, RecursionError) as e:
            reason, detail = _why(e)
            yield RawRecord(file, index, error=DataError(file, reason, detail, index=index, line=lineno), line=lineno)
        index += 1
