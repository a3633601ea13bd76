"""A rendered conversation cut into runs at the template's control tokens, and its labels from the assistant spans.

See :mod:`qwen_tune.data.chat_template` for why special tokens typed in data are marked before rendering and why
the spans are read off one full rendering.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Callable, Iterator, Sequence

from ..constants import IM_END
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
    """A rendering cut at the template's control tokens: ``runs[0], specials[0], runs[1], ..., runs[-1]`` in text
    order (one more run than specials; a run may be empty)."""

    text: str  # the rendered conversation, markers removed
    runs: list[tuple[int, str]]  # (start in text, text run) between template control tokens
    specials: list[tuple[int, int, int]]  # (start, end, id) of template-emitted special tokens


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
        # No special typed in data: every special-token string is the template's. One C-level split; positions and
        # ids by C-level maps (this runs once per conversation on the hot path).
        parts = self._bare_split.split(marked)
        pos = list(accumulate(map(len, parts), initial=0))
        runs = list(zip(pos[0::2], parts[0::2]))
        specials = list(zip(pos[1::2], pos[2::2], map(self._special_ids.__getitem__, parts[1::2])))
        return Rendered(marked, runs, specials)

    def _segment_marked(self, marked: str) -> Rendered:
        parts: list[str] = []
        starts: list[int] = [0]
        specials: list[tuple[int, int, int]] = []
        pos = last = 0
        for m in self._split_re.finditer(marked):
            parts.append(marked[last:m.start()])
            pos += m.start() - last
            last = m.end()
            if m.group(1) is not None:  # typed in data: stays in the text run, as plain text
                parts.append(m.group(1))
                pos += len(m.group(1))
            elif m.group(2) is not None:  # the template's own control token ends the run
                specials.append((pos, pos + len(m.group(2)), self._special_ids[m.group(2)]))
                parts.append(m.group(2))
                pos += len(m.group(2))
                starts.append(pos)
        parts.append(marked[last:])
        text = "".join(parts)
        ends = [s for s, _, _ in specials] + [len(text)]
        return Rendered(text, [(a, text[a:b]) for a, b in zip(starts, ends)], specials)

    # ------------------------------------------------------------------ encoding


def label_tokens(r: Rendered, encodings: list[Any], spans: Sequence[tuple[int, int]] = (),
                 offsets: Callable[[str, Sequence[int]], Iterator[tuple[int, int]]] | None = None
                 ) -> tuple[bytes, bytes]:
    """Ids of the rendering and their labels, as int32 bytes (:mod:`.ids`): a token is labelled when it overlaps
    an assistant span.

    Token char intervals are sorted, so the tokens overlapping a span ``[a, b)`` are one index range: from the first
    token ending after ``a`` to the first starting at or after ``b``. Only a run a span boundary cuts
    (``assistant\n`` + content) is walked by offsets to find it; labels are then slices of the ids. A run's encoding
    is its int32 bytes from the tiktoken fast path (its offsets from ``offsets(run, ids)``) or HF's Encoding.
    """
    specials, runs = r.specials, r.runs
    n_specials = len(specials)
    parts: list[bytes] = []
    # per item: char start, char end, its first token, its encoding (None: a control token), its text
    bounds: list[tuple[int, int, int, Any, str]] = []
    n = 0
    for k, (base, text) in enumerate(runs):
        enc = encodings[k]
        tids = enc if type(enc) is bytes else i32(enc.ids)
        parts.append(tids)
        bounds.append((base, base + len(text), n, enc, text))
        n += len(tids) >> 2
        if k < n_specials:
            start, end, tid = specials[k]
            parts.append(id_bytes(tid))
            bounds.append((start, end, n, None, ""))
            n += 1
    ids = b"".join(parts)
    labels: list[bytes] = []
    done = bi = 0  # tokens labelled (or ignored) so far; the item the pointer is at
    for a, b in spans:
        bi, k1 = _token_at(bounds, bi, a, n, offsets, after_end=True)
        bi, k2 = _token_at(bounds, bi, b, n, offsets, after_end=False)
        k1 = max(k1, done)  # a token straddling two spans is labelled once
        if k2 > k1:
            labels += (IGNORE_I32 * (k1 - done), ids[4 * k1:4 * k2])
            done = k2
    labels.append(IGNORE_I32 * (n - done))
    return ids, b"".join(labels)


def _token_at(bounds: list[tuple[int, int, int, Any, str]], bi: int, pos: int, n: int, offsets: Any,
              after_end: bool) -> tuple[int, int]:
    """The first token ending after ``pos`` (``after_end``) or starting at or after it, and the item it lies in;
    the search starts at item ``bi`` (positions come in text order)."""
    while bi < len(bounds) and bounds[bi][1] <= pos:
        bi += 1
    if bi == len(bounds):
        return bi, n
    start, _, first, enc, text = bounds[bi]
    if pos <= start:
        return bi, first
    if enc is None:  # inside a control token: it overlaps the position
        return bi, first if after_end else first + 1
    rel = pos - start
    k = first
    for s, e in (offsets(text, memoryview(enc).cast("i")) if type(enc) is bytes else enc.offsets):
        if (e > rel) if after_end else (s >= rel):
            return bi, k
        k += 1
    return bi, k


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
