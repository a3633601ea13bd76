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

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from ..constants import IGNORE_INDEX, IM_END, IM_START
from .formats import Conversation
from .tokenizer import encode_texts

DEFAULT_SYSTEM = "You are a helpful assistant."
MaskMode = Literal["reference", "assistant_only"]
TruncationMode = Literal["cut", "drop"]
# Bumped whenever encoding output changes, so cached tokenized datasets are rebuilt.
TEMPLATE_VERSION = "chatml-1"


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

    name = "chatml (Qwen-1 reference preprocess)"
    template_id = "chatml"

    def encode(self, convs: Sequence[Conversation]) -> list[EncodedSample]:
        # Qwen-1's ChatML has no tool-call layout (its ReAct prompt is a different training format),
        # so such records are dropped and counted; reasoning is kept out of the text and counted.
        usable = [c for c in convs if not c.has_tools]
        texts: list[str] = []
        for c in usable:
            texts.append(self.default_system if c.system is None else c.system)
            texts.extend(t for _, t in c.turns)
        pieces = iter(encode_texts(self.tokenizer, texts))
        out = []
        for c in convs:
            if c.has_tools:
                out.append(EncodedSample(c.id, [], [], drop_reason="chatml_has_no_tool_format"))
                continue
            turns = [("system", next(pieces))] + [(role, next(pieces)) for role, _ in c.turns]
            sample = self._assemble(c.id, turns)
            sample.notes = ["reasoning_not_rendered"] * sum(bool(e.get("reasoning_content")) for e in c.extras or [])
            out.append(sample)
        return out

    def _assemble(self, sample_id: str, turns: list[tuple[str, list[int]]]) -> EncodedSample:
        ids: list[int] = []
        labels: list[int] = []
        tail = [self.im_end] + self.nl
        for role, text in turns:
            header = [self.im_start] + self.role_ids[role] + self.nl
            ids += header + text + tail
            if role == "assistant":
                labels += [self.im_start if self.mask == "reference" else IGNORE_INDEX]
                labels += [IGNORE_INDEX] * (len(header) - 1) + text + tail
            elif self.mask == "reference":
                labels += [self.im_start] + [IGNORE_INDEX] * (len(header) - 1 + len(text)) + tail
            else:
                labels += [IGNORE_INDEX] * (len(header) + len(text) + len(tail))
        sample = EncodedSample(sample_id, ids, labels)
        if len(ids) > self.max_len:
            if self.truncation == "drop":
                sample.drop_reason = "too_long"
                return sample
            # The reference keeps the head and cuts the tail.
            sample.input_ids, sample.labels, sample.truncated = ids[: self.max_len], labels[: self.max_len], True
        if not self._has_assistant_label(sample, turns):
            sample.drop_reason = "no_assistant_label_after_truncation" if sample.truncated else "no_trainable_label"
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
