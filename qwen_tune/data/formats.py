"""Mapping records of the formats users already have onto conversations, with located errors.

Files are read into raw records by reader.py; this module validates each record and maps it.

Every record becomes a :class:`Conversation` (an optional system prompt plus user/assistant/tool
turns, with tool calls, reasoning and tool definitions kept beside them). A bad record raises :class:`DataError` naming the file, the record
index (and id) and the field, so a user can fix their data instead of reading a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

# Reading files lives in reader.py; re-exported here, where callers have always imported them from.
from .reader import DATA_SUFFIXES, DataError, RawRecord, list_data_files, loads, read_records  # noqa: F401

Format = Literal["qwen", "sharegpt", "openai", "alpaca"]
FORMATS: tuple[str, ...] = ("qwen", "sharegpt", "openai", "alpaca")

# Role spellings of the conversation formats, mapped onto ChatML roles.
_ROLES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant",
    "system": "system",
    "tool": "tool", "observation": "tool",  # LLaMA-Factory's ShareGPT spells tool results `observation`
    "function_call": "function_call",  # LLaMA-Factory: an assistant turn that only calls tools
}
# Per-message fields the OpenAI format defines and that are handed to the chat template as they are.
_PASSED_MESSAGE_FIELDS = ("name", "tool_call_id")
# Fields a format defines but that a text-only chat pipeline cannot use: counted as ignored, never silent.
_MEDIA_FIELDS = ("images", "videos", "audios")


@dataclass
class Conversation:
    id: str
    turns: list[tuple[str, str]]  # (role, text), role in {"user", "assistant", "tool"}
    system: str | None = None  # None: use the recipe's (or the template's) default system prompt
    dropped_leading_assistant: bool = False
    # Per turn (parallel to `turns`), or None when no turn has any: tool_calls / reasoning_content on
    # assistant turns, name / tool_call_id on tool turns, in the OpenAI message layout.
    extras: list[dict[str, Any]] | None = None
    tools: list[Any] | None = None  # tool definitions of the record (the template renders them)
    ignored: list[str] = field(default_factory=list)  # format-defined fields not used, one entry per occurrence

    @property
    def has_tools(self) -> bool:
        return bool(self.tools) or any(r == "tool" for r, _ in self.turns) or \
            any(e.get("tool_calls") for e in self.extras or [])

    @property
    def has_reasoning(self) -> bool:
        return any(e.get("reasoning_content") for e in self.extras or [])

    def messages(self, default_system: str | None = None) -> list[dict[str, Any]]:
        """OpenAI-style messages, as chat templates take them (a system message only when one applies)."""
        system = self.system if self.system is not None else default_system
        out: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
        for k, (role, text) in enumerate(self.turns):
            out.append({"role": role, "content": text, **(self.extras[k] if self.extras else {})})
        return out

    def to_dict(self) -> dict[str, Any]:
        # Tool calls and tool schemas vary per record, so they travel as one JSON string (an Arrow column
        # needs one schema); "" keeps the plain ChatML rows as small as before.
        extra = json.dumps({"extras": self.extras, "tools": self.tools}, ensure_ascii=False) \
            if self.extras or self.tools else ""
        return {"id": self.id, "system": self.system,
                "roles": [r for r, _ in self.turns], "texts": [t for _, t in self.turns], "extra": extra}

    @classmethod
    def from_row(cls, rid: str, system: str | None, roles: list[str], texts: list[str], extra: str = "") -> "Conversation":
        conv = cls(rid, list(zip(roles, texts)), system)
        if extra:
            d = json.loads(extra)
            conv.extras, conv.tools = d["extras"], d["tools"]
        return conv


# LLaMA-Factory's dataset_info.json `columns` names -> the keys this module reads (`messages` depends on the format).
_COLUMN_KEYS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                "system": "system", "tools": "tools", "chosen": "chosen", "rejected": "rejected"}


def remap_columns(value: Any, columns: dict[str, str] | None, fmt: str = "auto") -> Any:
    """A record with its custom column names (data.columns) renamed to the standard ones; others untouched."""
    if not columns or not isinstance(value, dict):
        return value
    out = dict(value)
    for name, key in columns.items():
        if key not in value:
            continue
        target = _COLUMN_KEYS.get(name)
        if name == "messages":
            turns = value[key]
            first = turns[0] if isinstance(turns, list) and turns else None
            openai = fmt == "openai" or (fmt == "auto" and isinstance(first, dict) and "role" in first)
            target = "messages" if openai else "conversations"
        if target and target != key:
            out[target] = out.pop(key)
    return out


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
    """The format of a file: the majority vote over its first records that decode."""
    votes: dict[str, int] = {}
    first_file, decoded = "<data>", 0
    for rec in records:
        first_file = rec.file
        if rec.error is not None:
            continue  # unreadable records say nothing about the format (and are reported one by one)
        decoded += 1
        if decoded > sample:
            break
        fmt = detect_format(rec.value)
        if fmt:
            votes[fmt] = votes.get(fmt, 0) + 1
    if not decoded:
        return "qwen"  # no record decodes: under any format each is reported invalid, with its own location
    if not votes:
        raise DataError(first_file, "unknown_format",
                        "cannot detect the data format: expected records with `conversations` (Qwen/ShareGPT), "
                        "`messages` (OpenAI) or `instruction`/`output` (Alpaca); set data.format to force one, "
                        "or data.columns to map other column names")
    return max(votes, key=votes.__getitem__)  # type: ignore[return-value]


def record_locator(rec: RawRecord) -> Callable[..., DataError]:
    """A factory of DataErrors naming the record's file, line, index and id, for validators of any record kind.

    Raises the record's own reading error first, and refuses a record that is not a JSON object.
    """
    value = rec.value
    if rec.error is not None:
        raise rec.error

    def err(reason: str, detail: str, fld: str | None = None) -> DataError:
        rid = value.get("id") if isinstance(value, dict) else None
        return DataError(rec.file, reason, detail, index=rec.index, record_id=None if rid is None else str(rid),
                         field=fld, line=rec.line)

    if not isinstance(value, dict):
        raise err("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    return err


def to_conversation(rec: RawRecord, fmt: Format) -> Conversation:
    """Validate one raw record and turn it into a Conversation, or raise a located DataError."""
    err = record_locator(rec)
    value = rec.value
    bad = _unencodable(value)
    if bad is not None:
        # A lone surrogate (JSON "\\ud800") decodes to a str no tokenizer can encode: refuse it here, where
        # `data check` and `train` both pass, rather than let the encoder crash on it.
        raise err("invalid_text", "text holds a lone UTF-16 surrogate (not encodable as UTF-8)", bad)
    rid = str(value["id"]) if value.get("id") is not None else f"{Path(rec.file).stem}-{rec.index}"
    ignored = [f"{k}" for k in _MEDIA_FIELDS if value.get(k)]
    tools = _tools(value, err) if fmt != "alpaca" else None
    if fmt == "alpaca":
        turns = _alpaca_turns(value, err)
    else:
        key = "messages" if fmt == "openai" else "conversations"
        if key not in value:
            raise err("missing_field", f"missing `{key}` (expected {fmt} format)", key)
        raw_turns = value[key]
        if not isinstance(raw_turns, list):
            raise err("wrong_type", f"`{key}` must be a list of turns, got {type(raw_turns).__name__}", key)
        parse = _openai_turn if fmt == "openai" else _sharegpt_turn
        turns = [parse(t, f"{key}[{j}]", err, ignored) for j, t in enumerate(raw_turns)]
        system = value.get("system") if fmt != "openai" else None
        if system is not None:
            if not isinstance(system, str):
                raise err("non_string_value", f"`system` must be a string, got {type(system).__name__}", "system")
            if turns and turns[0][0] == "system":
                raise err("misplaced_system", "both a top-level `system` and a leading system turn", "system")
            turns.insert(0, ("system", system, {}))
    conv = _check_turns(rid, turns, err, "messages" if fmt == "openai" else "conversations")
    conv.tools = tools
    conv.ignored = ignored
    return conv


def _msg(e: ValueError) -> str:
    return e.msg if isinstance(e, json.JSONDecodeError) else str(e)[:120]


def _unencodable(value: Any) -> str | None:
    """The path of the first string (or key) that is not encodable as UTF-8, found without recursion."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return where.encode("utf-8", "backslashreplace").decode("utf-8") or "<record>"
        elif isinstance(v, dict):
            for k, x in v.items():
                stack += [(f"{where}.{k}".lstrip("."), k), (f"{where}.{k}".lstrip("."), x)]
        elif isinstance(v, list):
            stack += [(f"{where}[{i}]", x) for i, x in enumerate(v)]
    return None


def _tools(value: dict, err) -> list[Any] | None:
    tools = value.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):  # LLaMA-Factory stores the tool list as a JSON string
        try:
            tools = loads(tools)
        except ValueError as e:
            raise err("invalid_tools", f"`tools` is a string but not valid JSON: {_msg(e)}", "tools") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise err("invalid_tools", "`tools` must be a list of tool (function schema) objects", "tools")
    return tools or None


def _text(t: dict, key: str, where: str, err, allow_none: bool = False) -> str:
    if key not in t:
        raise err("missing_field", f"turn has no `{key}`", f"{where}.{key}")
    text = t[key]
    if text is None and allow_none:
        return ""
    if not isinstance(text, str):
        raise err("non_string_value", f"`{key}` must be a string, got {type(text).__name__}", f"{where}.{key}")
    return text


def _role(t: Any, key: str, where: str, err) -> str:
    if not isinstance(t, dict):
        raise err("wrong_type", f"a turn must be an object, got {type(t).__name__}", where)
    if key not in t:
        raise err("missing_field", f"turn has no `{key}`", f"{where}.{key}")
    role = _ROLES.get(t[key]) if isinstance(t[key], str) else None
    if role is None:
        raise err("unknown_role", f"unknown role {t[key]!r} (expected one of {sorted(_ROLES)})", f"{where}.{key}")
    return role


def _tool_call(call: Any, where: str, err) -> dict[str, Any]:
    """One call in the OpenAI layout; JSON-string arguments are parsed, as Qwen templates expect a mapping."""
    if not isinstance(call, dict):
        raise err("invalid_tool_call", f"a tool call must be an object, got {type(call).__name__}", where)
    fn = call.get("function", call)  # OpenAI wraps the call in `function`; LLaMA-Factory does not
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise err("invalid_tool_call", "a tool call needs a string `name`", f"{where}.function.name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = loads(args) if args.strip() else {}
        except ValueError as e:
            raise err("invalid_tool_call", f"`arguments` is not valid JSON: {_msg(e)}", f"{where}.function.arguments") from None
    if not isinstance(args, dict):
        raise err("invalid_tool_call", "`arguments` must be a JSON object", f"{where}.function.arguments")
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


_OPENAI_KEYS = {"role", "content", "tool_calls", "reasoning_content", *_PASSED_MESSAGE_FIELDS}


def _openai_turn(t: Any, where: str, err, ignored: list[str]) -> tuple[str, str, dict[str, Any]]:
    role = _role(t, "role", where, err)
    if role == "function_call":
        raise err("unknown_role", "role `function_call` is ShareGPT's; OpenAI messages put `tool_calls` "
                  "on an assistant message", f"{where}.role")
    extra: dict[str, Any] = {}
    calls = t.get("tool_calls")
    if calls is not None and role != "assistant":
        raise err("invalid_tool_call", "only assistant messages can carry `tool_calls`", f"{where}.tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise err("invalid_tool_call", "`tool_calls` must be a list", f"{where}.tool_calls")
        extra["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{i}]", err) for i, c in enumerate(calls)]
    text = _text(t, "content", where, err, allow_none=bool(calls))
    reasoning = t.get("reasoning_content")
    if reasoning is not None:
        if role != "assistant" or not isinstance(reasoning, str):
            raise err("invalid_reasoning", "`reasoning_content` must be a string on an assistant message",
                      f"{where}.reasoning_content")
        extra["reasoning_content"] = reasoning
    for k in _PASSED_MESSAGE_FIELDS:
        if isinstance(t.get(k), str):
            extra[k] = t[k]
    ignored += [f"messages[].{k}" for k in t if k not in _OPENAI_KEYS]
    return role, text, extra


def _sharegpt_turn(t: Any, where: str, err, ignored: list[str]) -> tuple[str, str, dict[str, Any]]:
    role = _role(t, "from", where, err)
    text = _text(t, "value", where, err)
    if role != "function_call":
        ignored += [f"conversations[].{k}" for k in t if k not in ("from", "value")]
        return role, text, {}
    # LLaMA-Factory: the value is a JSON call {"name", "arguments"} or a list of them.
    try:
        calls = loads(text)
    except ValueError as e:
        raise err("invalid_tool_call", f"a function_call value must be JSON: {_msg(e)}", f"{where}.value") from None
    calls = calls if isinstance(calls, list) else [calls]
    return "assistant", "", {"tool_calls": [_tool_call(c, f"{where}.value", err) for c in calls]}


def _alpaca_turns(value: dict, err) -> list[tuple[str, str, dict]]:
    for k in ("instruction", "output"):
        if k not in value:
            raise err("missing_field", f"missing `{k}` (expected alpaca format)", k)
    for k in ("instruction", "input", "output", "system"):
        # null is "absent" for the optional fields, never for the prompt or the reply.
        optional = k in ("input", "system")
        if k in value and not isinstance(value[k], str) and not (optional and value[k] is None):
            raise err("non_string_value", f"`{k}` must be a string, got {type(value[k]).__name__}", k)
    prompt = value["instruction"]
    if value.get("input"):
        prompt = f"{prompt}\n\n{value['input']}"
    turns: list[tuple[str, str, dict]] = []
    if value.get("system"):
        turns.append(("system", value["system"], {}))
    history = value.get("history") or []
    if not isinstance(history, list):
        raise err("wrong_type", "`history` must be a list of [instruction, response] pairs", "history")
    for j, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise err("wrong_type", "a history entry must be an [instruction, response] pair of strings",
                      f"history[{j}]")
        turns += [("user", pair[0], {}), ("assistant", pair[1], {})]
    return turns + [("user", prompt, {}), ("assistant", value["output"], {})]


def _check_turns(rid: str, turns: list[tuple[str, str, dict]], err, key: str) -> Conversation:
    if not turns:
        raise err("empty_conversation", "conversation has no turns", key)
    system = None
    if turns[0][0] == "system":
        system = turns[0][1]
        turns = turns[1:]
    for j, (role, _, _) in enumerate(turns):
        if role == "system":
            raise err("misplaced_system", "a system turn is only allowed as the first turn", f"{key}[{j + (system is not None)}]")
    dropped = False
    # The reference finetune drops a leading non-user turn; do the same, but count it.
    if turns and turns[0][0] != "user":
        turns = turns[1:]
        dropped = True
    if not any(role == "assistant" for role, _, _ in turns):
        raise err("no_assistant_turn", "conversation has no assistant turn to learn from", key)
    extras = [e for _, _, e in turns] if any(e for _, _, e in turns) else None
    return Conversation(rid, [(r, t) for r, t, _ in turns], system, dropped, extras)
