"""Conversations rendered with the checkpoint's own chat template, token for token as inference sees them.

Qwen1.5 ... Qwen3.5 checkpoints ship a jinja ``chat_template``; vLLM and transformers render prompts with it,
so training must use the same layout (default system, ``<think>`` blocks, tool-call blocks). The template is
rendered in transformers' own jinja environment (the one ``tokenizer.apply_chat_template`` uses, with the
sandbox's attribute checks memoized: :mod:`qwen_tune.data.jinja_render`); nothing of any template is copied here.

Tokens are exactly ``tokenizer.apply_chat_template(messages, tools=..., tokenize=True)``, with one deliberate
exception: *special* control tokens typed inside data (``<|im_start|>``, ``<|im_end|>``, ...) are encoded as
plain text, so data cannot forge turns. Non-special added tokens (``<think>``, ``<tool_call>``, ...) are encoded
as the tokenizer does, in data and template alike. How: every special-token string in the data is wrapped in
private-use markers before rendering, so after rendering the template's own control tokens are the unmarked
ones. The rendered string is cut only at those; each maximal run between them (data and template text
together, markers removed) is tokenized in one piece with special tokens disabled, so BPE seams are those of
the whole string. (transformers' ``sanitize_control_tokens`` does the same marking but tokenizes each marked
token apart from its neighbours and returns no offsets, which labels need.) When the tokenizer is verified to be
qwen.tiktoken's BPE (every Qwen1.5+ checkpoint; :mod:`qwen_tune.data.fast_bpe`), runs go through tiktoken
directly, same ids and offsets, ~5x faster than the HF pipeline; a run that is not NFC still goes through HF.

Labels (``assistant_only``): these templates have no ``{% generation %}`` markers, and rendering prefixes is not
exact for Qwen3-style templates (whether a turn keeps its reasoning depends on later user turns). Every Qwen
template frames turns in ChatML, so the spans are read off the one full rendering: an assistant turn's body runs
from after the template-emitted ``<|im_start|>assistant\\n`` through its ``<|im_end|>`` and the ``\\n`` after it
(labelled, as Qwen-1's reference mask labels it). A token is labelled when any of its characters lies in a body
(the header's ``\\n`` can merge with content that starts with newlines). The number of assistant turns rendered
must equal the number of assistant messages, otherwise the sample is dropped as ``template_mismatch``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import ConfigError
from .fast_bpe import TiktokenRuns, tiktoken_runs
from .ids import IGNORE_I32, any_trained, as_list
from .formats import Conversation
from .rendered import Rendered, Segmenter, assistant_spans, label_tokens, mark
from .template import DEFAULT_SYSTEM, ChatMLEncoder, EncodedSample, TruncationMode, paused_gc
from .tokenizer import IM_END, IM_START, is_qwen1_tokenizer

log = logging.getLogger(__name__)
TEMPLATE_SETTINGS = ("auto", "chatml", "checkpoint")
# Rendered characters after which the fast path pays for its set-up (~1 s: HF costs ~0.4 us/char more).
_FAST_PATH_MIN_CHARS = 1_000_000


class ChatTemplateError(ConfigError):
    """The recipe asks for a template that does not exist or cannot be used; one readable line."""


@dataclass(frozen=True)
class ChatTemplate:
    """The template a run trains with: ``text`` None means Qwen-1's reference ChatML path."""

    kind: str  # "chatml" | "checkpoint" | "file"
    text: str | None
    origin: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256((self.text or "chatml").encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        if self.text is None:
            return "chatml (Qwen-1 reference preprocess)"
        return f"{self.kind} chat_template of {self.origin} (sha256 {self.sha256})"


def _tokenizer_template(tokenizer: Any) -> str | None:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # named templates: the default one renders conversations
        tpl = tpl.get("default")
    return tpl if isinstance(tpl, str) and tpl.strip() else None


def resolve_template(setting: str, tokenizer: Any, origin: str | None = None) -> ChatTemplate:
    """``auto``: the checkpoint's template when it has one, else ChatML; ``checkpoint`` insists on it."""
    where = origin or str(getattr(tokenizer, "name_or_path", "") or "the tokenizer")
    if setting == "chatml":
        return ChatTemplate("chatml", None)
    if setting in ("auto", "checkpoint"):
        # Qwen-1 checkpoints ship no template (QWenTokenizer's built-in one is only a ChatML convenience for
        # apply_chat_template): they train on the reference ChatML path, bit-identical to finetune.py.
        tpl = None if is_qwen1_tokenizer(tokenizer) else _tokenizer_template(tokenizer)
        if tpl is None:
            if setting == "checkpoint":
                raise ChatTemplateError(f"data.template: checkpoint: {where} has no chat_template (neither in "
                                        "tokenizer_config.json nor chat_template.jinja); use `chatml` or a .jinja file")
            return ChatTemplate("chatml", None)
        return ChatTemplate("checkpoint", tpl, where)
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ChatTemplateError(f"data.template: {setting!r} is neither auto|chatml|checkpoint nor an existing "
                                ".jinja file")
    return ChatTemplate("file", path.read_text(encoding="utf-8"), str(path))


def resolve_mask(mask: str, template: ChatTemplate) -> str:
    if mask == "auto":
        return "reference" if template.text is None else "assistant_only"
    if mask == "reference" and template.text is not None:
        raise ChatTemplateError("data.mask: reference is Qwen-1's ChatML label layout; with a chat template use "
                                "assistant_only (or auto), or set data.template: chatml")
    return mask


def make_encoder(tokenizer: Any, max_len: int, *, template: str = "auto", mask: str = "auto",
                 system_prompt: str | None = None, truncation: TruncationMode = "cut",
                 template_kwargs: dict[str, Any] | None = None, origin: str | None = None) -> Any:
    """The encoder a recipe's data settings ask for: a :class:`TemplateEncoder` or the reference ChatML one."""
    choice = resolve_template(template, tokenizer, origin)
    mode = resolve_mask(mask, choice)
    if choice.text is None:
        return ChatMLEncoder(tokenizer, max_len, mode, DEFAULT_SYSTEM if system_prompt is None else system_prompt,
                             truncation)  # type: ignore[arg-type]
    return TemplateEncoder(tokenizer, choice, max_len, system_prompt, truncation, template_kwargs)


def _tool_name(tool: Any) -> str:
    fn = tool.get("function", tool) if isinstance(tool, dict) else {}
    return str(fn.get("name", "")) if isinstance(fn, dict) else ""


class TemplateEncoder:
    """Conversations -> (input_ids, labels) through a jinja chat template; same interface as ChatMLEncoder."""

    mask = "assistant_only"

    def __init__(self, tokenizer: Any, template: ChatTemplate, max_len: int, system_prompt: str | None = None,
                 truncation: TruncationMode = "cut", template_kwargs: dict[str, Any] | None = None,
                 fast: bool = True) -> None:
        if template.text is None:
            raise ValueError("TemplateEncoder needs a jinja template; use ChatMLEncoder for Qwen-1's ChatML")
        if truncation not in ("cut", "drop"):
            raise ValueError(f"unknown truncation mode {truncation!r}: use 'cut' or 'drop'")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ChatTemplateError("a chat template needs a fast tokenizer (tokenizer.json); Qwen-1's tiktoken "
                                    "tokenizer trains with data.template: chatml")
        self.tokenizer, self.template, self.max_len = tokenizer, template, max_len
        self.system_prompt, self.truncation = system_prompt, truncation
        self.template_kwargs = dict(template_kwargs or {})
        self.name, self.template_id = template.name, template.sha256
        self._backend = backend
        self._renderer: Any = None
        self._render_kwargs = {**tokenizer.special_tokens_map, **self.template_kwargs}  # as apply_chat_template does
        specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content}
        self._special_ids = {s: tokenizer.convert_tokens_to_ids(s) for s in specials}
        self._segmenter = Segmenter(self._special_ids)
        self._special_re = self._segmenter.special_re
        # tiktoken directly when the tokenizer is verified to be qwen.tiktoken's BPE (same ids, ~5x faster),
        # decided on first need: parsing the ranks costs ~1 s, more than a small `data check` saves.
        self._fast: TiktokenRuns | None = None
        self._fast_decided = not fast
        self.fast_reason = "not decided yet" if fast else "disabled"
        self._chars_seen = 0
        self.im_start, self.im_end = self._special_ids.get(IM_START), self._special_ids.get(IM_END)
        if self.im_start is None or self.im_end is None:
            raise ChatTemplateError("the tokenizer has no <|im_start|>/<|im_end|> special tokens: Qwen chat templates "
                                    "frame turns with them")

    def __getstate__(self) -> dict[str, Any]:
        # datasets dill-pickles what a map or a streaming generator closes over; a compiled jinja template cannot
        # be pickled, and it is rebuilt on the next render.
        return {**self.__dict__, "_renderer": None}

    # ------------------------------------------------------------------ rendering

    def _render(self, messages: list[dict], tools: list | None, add_generation_prompt: bool) -> str:
        if self._renderer is None:
            # Imported here: the ChatML path (`qwen-tune data ...` on Qwen-1) never loads transformers.
            from .jinja_render import TemplateRenderer

            self._renderer = TemplateRenderer(self.template.text, **self._render_kwargs)
        # mark() rebuilt every container of the conversation, and its fields come from JSON / Arrow readers:
        # JSON types only, so transformers' defensive copy of the inputs is skipped.
        return self._renderer.render(messages, tools, add_generation_prompt, plain_inputs=True)

    def render_training(self, messages: list[dict], tools: list | None) -> tuple[str, bool]:
        """The marked rendering of a whole conversation, and the add_generation_prompt it was rendered with.

        Qwen1.5's template leaves the last message open unless add_generation_prompt is set (then it closes
        it with ``<|im_end|>\\n`` and, the last message being the assistant's, opens nothing). A model must
        learn to stop, so such a render is taken with add_generation_prompt when that only closes the turn.
        """
        marked = mark(messages, self._special_re), mark(tools, self._special_re) if tools else None
        text = self._render(marked[0], marked[1], False)
        if text.rstrip("\n").endswith(IM_END):
            return text, False
        closed = self._render(marked[0], marked[1], True)
        if closed.startswith(text) and IM_START not in closed[len(text):] and IM_END in closed[len(text):]:
            return closed, True
        return text, False

    def fast_path(self) -> TiktokenRuns | None:
        """The tiktoken run encoder if this tokenizer is verified to be Qwen's BPE (decided once)."""
        if not self._fast_decided:
            self._fast_decided = True
            self._fast, self.fast_reason = tiktoken_runs(self.tokenizer)
            if self._fast is None:
                log.info("chat template: tokenizing through the HF tokenizer (%s)", self.fast_reason)
        return self._fast

    def _encode_runs(self, texts: list[str]) -> list[Any]:
        if not self._fast_decided:
            self._chars_seen += sum(map(len, texts))
            if self._chars_seen >= _FAST_PATH_MIN_CHARS:
                self.fast_path()
        fast = self._fast
        if fast is None:
            return self._encode_runs_hf(texts)
        out: list[Any] = fast.encode_many(texts)  # int32 bytes; label_tokens asks fast.offsets where it walks
        slow = [k for k, ids in enumerate(out) if ids is None]  # not NFC: HF normalizes it and maps offsets back
        for k, e in zip(slow, self._encode_runs_hf([texts[k] for k in slow])):
            out[k] = e
        return out

    def _encode_runs_hf(self, texts: list[str]) -> list[Any]:
        if not texts:
            return []
        saved = self._backend.encode_special_tokens
        self._backend.encode_special_tokens = True  # special tokens inside a run are data: plain text
        try:
            return self._backend.encode_batch(texts, add_special_tokens=False)
        finally:
            self._backend.encode_special_tokens = saved

    def encode(self, convs: Sequence[Conversation]) -> list[EncodedSample]:
        with paused_gc():
            return self._encode(convs)

    def _encode(self, convs: Sequence[Conversation]) -> list[EncodedSample]:
        rendered: list[Rendered | None] = []
        errors: dict[int, str] = {}
        for k, c in enumerate(convs):
            try:
                text, _ = self.render_training(c.messages(self.system_prompt), c.tools)
                rendered.append(self._segmenter.segment(text))
            except Exception as e:  # noqa: BLE001 - a template's raise_exception / TypeError: one bad record
                errors[k] = f"{type(e).__name__}: {e}"
                rendered.append(None)
        encodings = self._encode_runs([run for r in rendered if r is not None for _, run in r.runs])
        out = []
        at = 0
        for k, (c, r) in enumerate(zip(convs, rendered)):
            if r is None:
                log.warning("id=%r: the chat template cannot render it: %s", c.id, errors[k])
                out.append(EncodedSample(c.id, [], [], drop_reason="template_error"))
                continue
            out.append(self._sample(c, r, encodings[at:at + len(r.runs)]))
            at += len(r.runs)
        return out

    def _sample(self, c: Conversation, r: Rendered, encodings: list[Any]) -> EncodedSample:
        spans = assistant_spans(r, self.im_start, self.im_end)
        ids, labels = label_tokens(r, encodings, spans, self._offsets)  # int32 bytes
        n = len(ids) >> 2
        n_assistant = sum(role == "assistant" for role, _ in c.turns)
        if len(spans) != n_assistant:
            log.warning("id=%r: the template rendered %d assistant turns for %d assistant messages", c.id,
                        len(spans), n_assistant)
            return EncodedSample(c.id, ids, IGNORE_I32 * n, drop_reason="template_mismatch")
        lost_calls = self._dropped_tool_calls(c, r, spans)
        if lost_calls:
            # An assistant turn whose only content is a call the template cannot show would train an empty turn.
            return EncodedSample(c.id, ids, IGNORE_I32 * n, drop_reason="template_drops_tool_calls")
        notes = self._dropped_reasoning(c, r, spans)
        if c.tools and not any(_tool_name(t) in r.text for t in c.tools):
            notes.append("tools_not_rendered")
        sample = EncodedSample(c.id, ids, labels, notes=notes)
        if n > self.max_len:
            if self.truncation == "drop":
                sample.drop_reason = "too_long"
                return sample
            cut = 4 * self.max_len
            ids, labels = ids[:cut], labels[:cut]
            sample.input_ids, sample.labels, sample.truncated = ids, labels, True
        if not any_trained(labels[4:]):  # label position 0 is never used by the shifted loss
            sample.drop_reason = "no_assistant_label_after_truncation" if sample.truncated else "no_trainable_label"
        return sample

    @staticmethod
    def _dropped_reasoning(c: Conversation, r: Rendered, spans: list[tuple[int, int]]) -> list[str]:
        """One note per assistant message whose reasoning the template did not render (earlier turns)."""
        if not c.extras:  # no message carries reasoning
            return []
        notes = []
        k = 0
        for (role, _), extra in zip(c.turns, c.extras or [{}] * len(c.turns)):
            if role != "assistant":
                continue
            reasoning = (extra.get("reasoning_content") or "").strip()
            if reasoning and reasoning not in r.text[spans[k][0]:spans[k][1]]:
                notes.append("reasoning_dropped_by_template")
            k += 1
        return notes

    @staticmethod
    def _dropped_tool_calls(c: Conversation, r: Rendered, spans: list[tuple[int, int]]) -> int:
        if not c.extras:  # no message carries tool calls
            return 0
        lost = k = 0
        for (role, _), extra in zip(c.turns, c.extras):
            if role != "assistant":
                continue
            body = r.text[spans[k][0]:spans[k][1]]
            lost += sum(call["function"]["name"] not in body for call in extra.get("tool_calls") or [])
            k += 1
        return lost

    def encode_prompt(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """Ids of a conversation so far plus the template's generation prompt (what `qwen-tune chat` feeds)."""
        marked = self._render(mark(messages, self._special_re), mark(tools, self._special_re) if tools else None,
                              True)
        r = self._segmenter.segment(marked)
        return as_list(label_tokens(r, self._encode_runs([run for _, run in r.runs]), (), self._offsets)[0])

    @property
    def _offsets(self) -> Any:
        return self._fast.offsets if self._fast is not None else None
