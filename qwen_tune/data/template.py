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
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

from ..constants import IGNORE_INDEX, IM_END, IM_START
from .formats import Conversation
from .tokenizer import encode_texts

DEFAULT_SYSTEM = "You are a helpful assistant."
MaskMode = Literal["reference", "assistant_only"]
TruncationMode = Literal["cut", "drop"]
# Bumped whenever encoding output changes, so cached tokenized datasets are rebuilt.
TEMPLATE_VERSION = "chatml-1"
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


@dataclass
class EncodedSample:
    id: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    drop_reason: str = ""  # "" = kept
    notes: list[str] = field(default_factory=list)  # what the template did not render, one entry per occurrence


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
        # The template's constant pieces, built once: per-role header ids and labels, the turn tail.
        ref = mask == "reference"
        self._tail = [self.im_end] + nl
        self._header = {r: [self.im_start] + ids + nl for r, ids in self.role_ids.items()}
        self._header_labels = {r: [self.im_start if ref else IGNORE_INDEX] + [IGNORE_INDEX] * (len(h) - 1)
                               for r, h in self._header.items()}
        self._tail_other = self._tail if ref else [IGNORE_INDEX] * len(self._tail)
        self._system_cache: dict[str, list[int]] = {}  # system prompts repeat across a whole data set

    name = "chatml (Qwen-1 reference preprocess)"
    template_id = "chatml"

    def _systems(self, convs: Sequence[Conversation]) -> dict[str, list[int]]:
        cache = self._system_cache
        default = self.default_system
        new = list({default if c.system is None else c.system for c in convs} - cache.keys())
        if len(cache) + len(new) > _SYSTEM_CACHE_SIZE:
            cache.clear()
        cache.update(zip(new, encode_texts(self.tokenizer, new)))
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
        pieces = encode_texts(self.tokenizer, texts)
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

    def _assemble(self, sample_id: str, system: list[int], turns: list[tuple[str, str]],
                  pieces: list[list[int]]) -> EncodedSample:
        # extend() into two lists, headers and labels prebuilt: no per-turn temporaries (this loop is the whole
        # cost of the encoder on top of tiktoken).
        header, header_labels, tail, tail_other = self._header, self._header_labels, self._tail, self._tail_other
        ids = header["system"] + system + tail
        labels = header_labels["system"] + [IGNORE_INDEX] * len(system) + tail_other
        has_assistant = False
        for (role, _), text in zip(turns, pieces):
            ids.extend(header[role])
            ids.extend(text)
            ids.extend(tail)
            labels.extend(header_labels[role])
            if role == "assistant":
                has_assistant = True
                labels.extend(text)
                labels.extend(tail)
            else:
                labels.extend([IGNORE_INDEX] * len(text))
                labels.extend(tail_other)
        sample = EncodedSample(sample_id, ids, labels)
        if len(ids) <= self.max_len:
            # Untruncated, a sample keeps an assistant label exactly when it has an assistant turn.
            if not has_assistant:
                sample.drop_reason = "no_trainable_label"
            return sample
        if self.truncation == "drop":
            sample.drop_reason = "too_long"
            return sample
        # The reference keeps the head and cuts the tail.
        sample.input_ids, sample.labels, sample.truncated = ids[: self.max_len], labels[: self.max_len], True
        if not self._has_assistant_label(sample, [("system", system)] + [(r, p) for (r, _), p in zip(turns, pieces)]):
            sample.drop_reason = "no_assistant_label_after_truncation"
        return sample

    def _has_assistant_label(self, sample: EncodedSample, turns: list[tuple[str, list[int]]]) -> bool:
        """True if some assistant token still carries a label the loss can see.

        A sample whose only labels are the structural tokens of system/user turns teaches the
        model nothing useful, so it is dropped and counted rather than fed as near-zero loss.
        """
        pos = 0
        limit = len(sample.input_ids)
        for role, text in turns:
            start = pos + 1 + len(self.role_ids[role]) + len(self.nl)
            pos = start + len(text) + 1 + len(self.nl)
            # Label position 0 is never used by the shifted loss.
            if role == "assistant" and max(start, 1) < min(pos, limit):
                return True
            if pos >= limit:
                break
        return False
