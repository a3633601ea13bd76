"""ChatML rendering and label masking, token for token as Qwen's reference `preprocess()`.

Layout: ``<|im_start|>system\\n{system}<|im_end|>\\n`` then ``<|im_start|>{role}\\n{text}<|im_end|>\\n``
per turn, each piece tokenized separately. Label rules (``-100`` = ignored):

* ``reference``: every ``<|im_start|>`` keeps its label; system and user turns ignore everything
  else but their closing ``<|im_end|>`` and ``\\n``; an assistant turn ignores ``assistant\\n`` and
  keeps its text, ``<|im_end|>`` and ``\\n``.
* ``assistant_only``: only assistant text, its ``<|im_end|>`` and ``\\n`` keep labels.

Text from data is encoded as plain text (see ``encode_texts``): only this template inserts
control tokens, so a user typing ``<|im_end|>`` cannot forge a turn.
"""

from __future__ import annotations

import contextlib
import gc
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

from ..constants import IGNORE_INDEX, IM_END, IM_START
from .formats import Conversation
from .ids import IGNORE_I32, as_list, i32, int32_array
from .tokenizer import encode_texts, encode_texts_i32

if TYPE_CHECKING:
    import numpy as np

DEFAULT_SYSTEM = "You are a helpful assistant."
MaskMode = Literal["reference", "assistant_only"]
TruncationMode = Literal["cut", "drop"]
# Bumped whenever encoding output changes, so cached tokenized datasets are rebuilt.
TEMPLATE_VERSION = "chatml-2"  # 2: an int32 label column (was int64)
_SYSTEM_CACHE_SIZE = 1024


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic GC off while a batch is encoded.

    Encoding allocates one list per text piece and per sample, all acyclic and all kept until the batch is done:
    each allocation burst triggers collections that re-walk the growing batch (~20% of the encoder's time on top
    of tiktoken). Nothing here makes a cycle, so nothing is left for the collector to find.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if not gc.get_freeze_count():
                # Hand the batch's objects to the oldest generation (freeze + unfreeze: O(1) list moves, and the
                # young count reset). Re-enabling as is would collect generation 0 at the next allocation and walk
                # every id of the batch once more, ~8% of the encoder's time. Skipped when the program froze
                # objects itself (a pre-fork server): unfreezing would undo that.
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def _has_tools(c: Conversation) -> bool:
    """``Conversation.has_tools`` without its generator expressions (called once per sample on the hot path)."""
    if c.tools:
        return True
    if c.extras and any(e.get("tool_calls") for e in c.extras):
        return True
    for role, _ in c.turns:
        if role == "tool":
            return True
    return False


def render_chatml(conv: Conversation, default_system: str = DEFAULT_SYSTEM) -> str:
    """The exact text the model sees for a conversation (before truncation)."""
    system = default_system if conv.system is None else conv.system
    out = f"{IM_START}system\n{system}{IM_END}\n"
    for role, text in conv.turns:
        out += f"{IM_START}{role}\n{text}{IM_END}\n"
    return out


class EncodedSample:
    """One encoded conversation: ids, labels, and what happened to it.

    ``input_ids`` / ``labels`` read as lists. The encoders store them as int32 bytes (:mod:`.ids`); the lists are
    made on first read, and :meth:`arrays` hands Arrow the bytes as they are, so the tokenize path never makes them.
    """

    __slots__ = ("id", "_ids", "_labels", "truncated", "drop_reason", "notes")

    def __init__(self, id: str, input_ids: list[int] | bytes, labels: list[int] | bytes, truncated: bool = False,
                 drop_reason: str = "", notes: list[str] | None = None) -> None:
        self.id, self._ids, self._labels = id, input_ids, labels
        self.truncated = truncated
        self.drop_reason = drop_reason  # "" = kept
        self.notes = [] if notes is None else notes  # what the template did not render, one entry per occurrence

    @property
    def input_ids(self) -> list[int]:
        self._ids = as_list(self._ids)
        return self._ids

    @input_ids.setter
    def input_ids(self, ids: list[int] | bytes) -> None:
        self._ids = ids

    @property
    def labels(self) -> list[int]:
        self._labels = as_list(self._labels)
        return self._labels

    @labels.setter
    def labels(self, labels: list[int] | bytes) -> None:
        self._labels = labels

    @property
    def length(self) -> int:
        return len(self._ids) >> 2 if type(self._ids) is bytes else len(self._ids)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """ids and labels as int32 arrays (views of the bytes when the encoder made bytes)."""
        return int32_array(self._ids), int32_array(self._labels)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EncodedSample):
            return NotImplemented
        return (self.id, self.input_ids, self.labels, self.truncated, self.drop_reason, self.notes) == \
            (other.id, other.input_ids, other.labels, other.truncated, other.drop_reason, other.notes)

    def __repr__(self) -> str:
        return (f"EncodedSample(id={self.id!r}, input_ids={self.input_ids!r}, labels={self.labels!r}, "
                f"truncated={self.truncated}, drop_reason={self.drop_reason!r}, notes={self.notes!r})")


class ChatMLEncoder:
    """Turns conversations into (input_ids, labels) with reference-compatible masking.

    Text pieces of a whole batch of conversations go through the tokenizer in one batch call
    (the slow part), and the template is assembled from ids afterwards.
    """

    def __init__(self, tokenizer: Any, max_len: int, mask: MaskMode = "reference",
                 default_system: str = DEFAULT_SYSTEM, truncation: TruncationMode = "cut") -> None:
        if mask not in ("reference", "assistant_only"):
            raise ValueError(f"unknown masking mode {mask!r}: use 'reference' or 'assistant_only'")
        if truncation not in ("cut", "drop"):
            raise ValueError(f"unknown truncation mode {truncation!r}: use 'cut' or 'drop'")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.mask = mask
        self.default_system = default_system
        self.truncation = truncation
        self.im_start = tokenizer.convert_tokens_to_ids(IM_START)
        self.im_end = tokenizer.convert_tokens_to_ids(IM_END)
        nl, system, user, assistant = encode_texts(tokenizer, ["\n", "system", "user", "assistant"])
        self.nl = nl
        self.role_ids = {"system": system, "user": user, "assistant": assistant}
        # The template's constant pieces, built once as int32 bytes: per-role header ids and labels, the turn tail.
        ref = mask == "reference"
        tail = [self.im_end] + nl
        self._tail, self._tail_other = i32(tail), i32(tail if ref else [IGNORE_INDEX] * len(tail))
        headers = {r: [self.im_start] + ids + nl for r, ids in self.role_ids.items()}
        self._header = {r: i32(h) for r, h in headers.items()}
        self._header_labels = {r: i32([self.im_start if ref else IGNORE_INDEX] + [IGNORE_INDEX] * (len(h) - 1))
                               for r, h in headers.items()}
        self._system_cache: dict[str, bytes] = {}  # system prompts repeat across a whole data set

    name = "chatml (Qwen-1 reference preprocess)"
    template_id = "chatml"

    def _systems(self, convs: Sequence[Conversation]) -> dict[str, bytes]:
        cache = self._system_cache
        default = self.default_system
        new = list({default if c.system is None else c.system for c in convs} - cache.keys())
        if len(cache) + len(new) > _SYSTEM_CACHE_SIZE:
            cache.clear()
        cache.update(zip(new, map(bytes, encode_texts_i32(self.tokenizer, new))))
        return cache

    def encode(self, convs: Sequence[Conversation]) -> list[EncodedSample]:
        with paused_gc():
            return self._encode(convs)

    def _encode(self, convs: Sequence[Conversation]) -> list[EncodedSample]:
        # Qwen-1's ChatML has no tool-call layout (its ReAct prompt is a different training format),
        # so such records are dropped and counted; reasoning is kept out of the text and counted.
        tools = [_has_tools(c) for c in convs]
        texts: list[str] = []
        for c, t in zip(convs, tools):
            if not t:
                texts.extend([x for _, x in c.turns])
        systems = self._systems([c for c, t in zip(convs, tools) if not t])
        pieces = encode_texts_i32(self.tokenizer, texts)
        out = []
        k = 0
        default = self.default_system
        for c, t in zip(convs, tools):
            if t:
                out.append(EncodedSample(c.id, [], [], drop_reason="chatml_has_no_tool_format"))
                continue
            n = len(c.turns)
            sample = self._assemble(c.id, systems[default if c.system is None else c.system],
                                    c.turns, pieces[k:k + n])
            k += n
            if c.extras:
                sample.notes = ["reasoning_not_rendered"] * sum(bool(e.get("reasoning_content")) for e in c.extras)
            out.append(sample)
        return out

    def _assemble(self, sample_id: str, system: bytes, turns: list[tuple[str, str]],
                  pieces: list[Any]) -> EncodedSample:
        # One b"".join each for ids and labels over the pieces' buffers and the prebuilt headers: memcpy, no
        # Python int per token (this loop is the whole cost of the encoder on top of tiktoken).
        header, header_labels, tail, tail_other = self._header, self._header_labels, self._tail, self._tail_other
        ign = IGNORE_I32
        ids = [header["system"], system, tail]
        labels = [header_labels["system"], ign * (len(system) >> 2), tail_other]
        has_assistant = False
        for (role, _), text in zip(turns, pieces):
            ids += (header[role], text, tail)
            if role == "assistant":
                has_assistant = True
                labels += (header_labels[role], text, tail)
            else:
                labels += (header_labels[role], ign * (memoryview(text).nbytes >> 2), tail_other)
        sample = EncodedSample(sample_id, b"".join(ids), b"".join(labels))
        if sample.length <= self.max_len:
            # Untruncated, a sample keeps an assistant label exactly when it has an assistant turn.
            if not has_assistant:
                sample.drop_reason = "no_trainable_label"
            return sample
        if self.truncation == "drop":
            sample.drop_reason = "too_long"
            return sample
        # The reference keeps the head and cuts the tail.
        cut = 4 * self.max_len
        sample.input_ids, sample.labels, sample.truncated = sample._ids[:cut], sample._labels[:cut], True
        lengths = [("system", len(system) >> 2)] + [(r, memoryview(p).nbytes >> 2) for (r, _), p in zip(turns, pieces)]
        if not self._has_assistant_label(lengths):
            sample.drop_reason = "no_assistant_label_after_truncation"
        return sample

    def _has_assistant_label(self, turns: list[tuple[str, int]]) -> bool:
        """True if some assistant token still carries a label the loss can see, the sample cut at max_len.

        A sample whose only labels are the structural tokens of system/user turns teaches the
        model nothing useful, so it is dropped and counted rather than fed as near-zero loss.
        """
        pos = 0
        limit = self.max_len
        for role, n in turns:
            start = pos + 1 + len(self.role_ids[role]) + len(self.nl)
            pos = start + n + 1 + len(self.nl)
            # Label position 0 is never used by the shifted loss.
            if role == "assistant" and max(start, 1) < min(pos, limit):
                return True
            if pos >= limit:
                break
        return False
