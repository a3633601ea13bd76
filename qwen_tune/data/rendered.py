"""A rendered conversation cut into runs at the template's control tokens, and its labels from the assistant spans.

See :mod:`qwen_tune.data.chat_template` for why special tokens typed in data are marked before rendering and why
the spans are read off one full rendering.
"""

from __future__ import annotations

import re
from array import array
from dataclasses import dataclass
from typing import Any, Sequence

from ..constants import IGNORE_INDEX, IM_END
from .ids import IGNORE_I32, i32, id_bytes

# Private-use code points no tokenizer text contains; wrapped around special tokens typed in data.
MARK_START, MARK_END = "\U000f0100", "\U000f0101"


def _wrap(m: re.Match) -> str:
    return MARK_START + m.group(0) + MARK_END


def mark(obj: Any, pattern: re.Pattern) -> Any:
    """A fresh copy of ``obj`` with every special-token string inside its strings wrapped in markers.

    Called once per conversation on the hot path: a message's string fields are marked inline, without a call each.
    """
    if isinstance(obj, str):
        return pattern.sub(_wrap, obj)
    if isinstance(obj, dict):
        sub = pattern.sub
        return {k: sub(_wrap, v) if type(v) is str else mark(v, pattern) for k, v in obj.items()}
    if isinstance(obj, list):
        return [mark(v, pattern) for v in obj]
    return obj


@dataclass
class Rendered:
    text: str  # the rendered conversation, markers removed
    runs: list[tuple[int, str]]  # (start in text, text run) between template control tokens
    specials: list[tuple[int, int, int]]  # (start, end, id) of template-emitted special tokens
    items: list[tuple[str, int]]  # in order: ("run", index into runs) or ("special", index into specials)


class Segmenter:
    """Cuts a marked rendering at the template's own special tokens (see chat_template's docstring)."""

    def __init__(self, special_ids: dict[str, int]) -> None:
        specials = sorted(special_ids, key=len, reverse=True)
        alt = "|".join(map(re.escape, specials)) or "(?!)"
        self.special_re = re.compile(alt)
        # A marked special (data: plain text), a stray marker (a template string method split a pair), or a
        # bare special (the template's own control token).
        self._split_re = re.compile(f"{MARK_START}({alt}){MARK_END}|[{MARK_START}{MARK_END}]|({alt})")
        self._bare_split = re.compile(f"({alt})")
        self._special_ids = special_ids

    def segment(self, marked: str) -> Rendered:
        if MARK_START in marked or MARK_END in marked:
            return self._segment_marked(marked)
        # No special typed in data: every special-token string is the template's (one C-level split).
        parts = self._bare_split.split(marked)
        runs: list[tuple[int, str]] = []
        specials: list[tuple[int, int, int]] = []
        items: list[tuple[str, int]] = []
        special_ids = self._special_ids
        pos = 0
        for k in range(0, len(parts) - 1, 2):
            run, sp = parts[k], parts[k + 1]
            if run:
                items.append(("run", len(runs)))
                runs.append((pos, run))
                pos += len(run)
            items.append(("special", len(specials)))
            specials.append((pos, pos + len(sp), special_ids[sp]))
            pos += len(sp)
        if parts[-1]:
            items.append(("run", len(runs)))
            runs.append((pos, parts[-1]))
        return Rendered(marked, runs, specials, items)

    def _segment_marked(self, marked: str) -> Rendered:
        parts: list[str] = []
        bounds: list[tuple[int, int]] = []
        specials: list[tuple[int, int, int]] = []
        items: list[tuple[str, int]] = []
        pos = last = run_start = 0
        for m in self._split_re.finditer(marked):
            parts.append(marked[last:m.start()])
            pos += m.start() - last
            last = m.end()
            if m.group(1) is not None:  # typed in data: stays in the text run, as plain text
                parts.append(m.group(1))
                pos += len(m.group(1))
            elif m.group(2) is not None:  # the template's own control token ends the run
                if pos > run_start:
                    bounds.append((run_start, pos))
                    items.append(("run", len(bounds) - 1))
                specials.append((pos, pos + len(m.group(2)), self._special_ids[m.group(2)]))
                items.append(("special", len(specials) - 1))
                parts.append(m.group(2))
                pos += len(m.group(2))
                run_start = pos
        parts.append(marked[last:])
        pos += len(marked) - last
        if pos > run_start:
            bounds.append((run_start, pos))
            items.append(("run", len(bounds) - 1))
        text = "".join(parts)
        return Rendered(text, [(s, text[s:e]) for s, e in bounds], specials, items)

    # ------------------------------------------------------------------ encoding


def label_tokens(r: Rendered, encodings: list[Any],
                 spans: Sequence[tuple[int, int]] = ()) -> tuple[bytes, bytes]:
    """Ids of the rendering and their labels, as int32 bytes (:mod:`.ids`): a token is labelled when it overlaps
    an assistant span.

    Most runs lie wholly inside or outside every span and are labelled in bulk; only a run a span
    boundary cuts (``assistant\n`` + content, the ``\n`` after ``<|im_end|>``) is walked by offsets.
    Items and spans are both in text order (spans disjoint), so one pointer walks the spans. An encoding's ids
    are int32 bytes (the tiktoken fast path) or a list (HF's Encoding).
    """
    ids: list[bytes] = []
    labels: list[bytes] = []
    n_spans = len(spans)
    si = 0
    for kind, idx in r.items:
        if kind == "special":
            start, _, tid = r.specials[idx]
            b = id_bytes(tid)
            ids.append(b)
            while si < n_spans and spans[si][1] <= start:
                si += 1
            labels.append(b if si < n_spans and spans[si][0] <= start else IGNORE_I32)
            continue
        base, text = r.runs[idx]
        enc = encodings[idx]
        tids = enc.ids if type(enc.ids) is bytes else i32(enc.ids)
        n = len(tids) >> 2
        ids.append(tids)
        end = base + len(text)
        while si < n_spans and spans[si][1] <= base:
            si += 1
        j = si
        while j < n_spans and spans[j][0] < end:
            j += 1
        if j == si:
            labels.append(IGNORE_I32 * n)
            continue
        cut = spans[si:j]
        if cut[0][0] <= base and cut[0][1] >= end:
            labels.append(tids)
            continue
        # Walk tokens only up to the last boundary in the run; past it, all lie on one side. Offsets are
        # run-relative, so the spans are moved into the run's frame once.
        cut = [(a - base, b - base) for a, b in cut]
        last = max(x for a, b in cut for x in (a, b) if 0 < x < end - base)
        inside_tail = cut[-1][0] <= end - base - 1 < cut[-1][1]
        walked = array("i")
        for t, (s, e) in zip(memoryview(tids).cast("i"), enc.offsets):
            if s >= last:
                break
            walked.append(t if any(s < b and e > a for a, b in cut) else IGNORE_INDEX)
        k = len(walked)
        labels.append(walked.tobytes())
        labels.append(tids[4 * k:] if inside_tail else IGNORE_I32 * (n - k))
    return b"".join(ids), b"".join(labels)


def assistant_spans(r: Rendered, im_start: int, im_end: int) -> list[tuple[int, int]]:
    """Assistant turn bodies: after a template-emitted ``<|im_start|>assistant\\n`` through ``<|im_end|>`` + ``\\n``."""
    spans = []
    text = r.text
    header = "assistant\n"
    end_positions = [s for s, _, tid in r.specials if tid == im_end]
    ei = 0
    for s, e, tid in r.specials:
        if tid != im_start or not text.startswith(header, e):
            continue
        body = e + len(header)
        while ei < len(end_positions) and end_positions[ei] < body:
            ei += 1
        if ei == len(end_positions):
            end = len(text)
        else:
            close = end_positions[ei]
            end = close + len(IM_END) + (text.startswith("\n", close + len(IM_END)))
        spans.append((body, end))
    return spans
