"""Accounting of every record that was skipped, dropped or truncated: nothing is lost silently."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .formats import DataError

_REASON_TEXT = {
    "invalid_json": "invalid JSON",
    "too_deep": "nested deeper than the JSON parser allows",
    "invalid_text": "lone UTF-16 surrogate in a string",
    "not_utf8": "not valid UTF-8",
    "not_an_object": "record is not a JSON object",
    "missing_field": "missing field",
    "wrong_type": "wrong type",
    "unknown_role": "unknown role",
    "non_string_value": "non-string value",
    "empty_conversation": "empty conversation",
    "no_assistant_turn": "no assistant turn",
    "misplaced_system": "system turn not first",
    "too_long": "longer than max_len (truncation: drop)",
    "no_trainable_label": "no trainable label",
    "no_assistant_label_after_truncation": "no assistant token left after truncation",
    "identical_pair": "chosen and rejected replies are identical",
    "prompt_too_long": "prompt alone fills max_len",
    "prompt_mismatch": "chosen and rejected do not share their prompt",
    "no_user_turn": "prompt does not end with a user turn",
    "invalid_tools": "invalid `tools`",
    "invalid_tool_call": "invalid tool call",
    "invalid_reasoning": "invalid `reasoning_content`",
    "chatml_has_no_tool_format": "tool calls / tool results, but Qwen-1's ChatML has no tool format "
                                 "(use a checkpoint chat template)",
    "template_error": "the chat template cannot render it (see the log)",
    "template_mismatch": "the template rendered a different number of assistant turns",
    "template_drops_tool_calls": "tool calls the chat template does not render",
    "reasoning_not_rendered": "reasoning_content not rendered (Qwen-1 ChatML has no reasoning format)",
    "reasoning_dropped_by_template": "reasoning_content the template drops (earlier turns)",
    "tools_not_rendered": "tool definitions the template does not render",
}


@dataclass
class DataReport:
    """Counts per reason, the first few locations of each for the summary, and every location for data_errors.jsonl."""

    name: str = "train"
    records: int = 0
    kept: int = 0
    truncated: int = 0
    leading_assistant_dropped: int = 0
    skipped: Counter = field(default_factory=Counter)  # invalid records, by reason
    dropped: Counter = field(default_factory=Counter)  # valid records not kept, by reason
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3
    template: str = ""  # the chat template the split was rendered with
    ignored: Counter = field(default_factory=Counter)  # fields (or parts) not used, by name; samples kept
    locations: list[dict[str, Any]] = field(default_factory=list)  # every invalid or dropped record

    def add_error(self, e: DataError) -> None:
        self.skipped[e.reason] += 1
        self._example(e.reason, str(e))
        self.locations.append({"split": self.name, "kind": "invalid", **e.to_dict()})

    def add_drop(self, reason: str, where: str, record_id: str | None = None) -> None:
        self.dropped[reason] += 1
        self._example(reason, where)
        self.locations.append({"split": self.name, "kind": "dropped", "reason": reason, "id": record_id,
                               "detail": where})

    def _example(self, reason: str, text: str) -> None:
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(text)

    @property
    def lost(self) -> int:
        return sum(self.skipped.values()) + sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "records": self.records, "kept": self.kept, "truncated": self.truncated,
                "leading_assistant_dropped": self.leading_assistant_dropped,
                "skipped": dict(self.skipped), "dropped": dict(self.dropped), "examples": self.examples,
                "template": self.template, "ignored": dict(self.ignored), "locations": self.locations}

    def lines(self, all_locations: bool = False) -> list[str]:
        """The summary; `all_locations` lists every invalid / dropped record instead of the first few per reason."""
        out = [f"[{self.name}] {self.records} records read, {self.kept} kept, "
               f"{sum(self.skipped.values())} invalid, {sum(self.dropped.values())} dropped, {self.truncated} truncated"]
        if self.template:
            out.append(f"  template: {self.template}")
        if self.leading_assistant_dropped:
            out.append(f"  {self.leading_assistant_dropped} conversations started with an assistant turn; "
                       "that turn was dropped (as the reference does)")
        for kind, counter in (("invalid", self.skipped), ("dropped", self.dropped)):
            for reason, n in counter.most_common():
                out.append(f"  {kind}: {n} x {_REASON_TEXT.get(reason, reason)}")
                if all_locations:
                    out.extend(f"    at {_where(loc)}" for loc in self.locations if loc["reason"] == reason
                               and loc["kind"] == kind)
                    continue
                shown = self.examples.get(reason, [])
                out.extend(f"    e.g. {ex}" for ex in shown)
                if n > len(shown):
                    out.append(f"    ... {n - len(shown)} more (every one: `data check --all`, or data_errors.jsonl)")
        for what, n in self.ignored.most_common():
            out.append(f"  ignored (sample kept): {n} x {_REASON_TEXT.get(what, f'field `{what}`')}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _where(loc: dict[str, Any]) -> str:
    if loc["kind"] == "dropped":
        return loc["detail"]
    return str(DataError(loc["file"], loc["reason"], loc["detail"], loc["index"], loc["id"], loc["field"], loc["line"]))


def write_errors(path: Any, reports: list[DataReport]) -> int:
    """Every invalid or dropped record of `reports`, one JSON object a line; returns how many."""
    import json

    rows = [loc for r in reports for loc in r.locations]
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return len(rows)
