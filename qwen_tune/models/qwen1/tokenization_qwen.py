"""The Qwen-1 tokenizer: tiktoken BPE over ``qwen.tiktoken`` as a transformers ``PreTrainedTokenizer``.

Token ids equal the original Qwen-1 ``tokenization_qwen.py``: the text is NFC-normalized, then encoded by tiktoken with
every special token allowed. Encoding and decoding go straight to tiktoken. Tokens (``tokenize``,
``convert_ids_to_tokens``, ``get_vocab``) are byte-level unicode strings, as in GPT-2/Qwen2 ``vocab.json`` (the
original Qwen-1 tokenizer used ``bytes``; ``convert_tokens_to_ids`` accepts both).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Sequence
from typing import Any

from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken, BatchEncoding, PaddingStrategy, TruncationStrategy

from ...constants import ENDOFTEXT, ENDOFTEXT_ID, IM_END, IM_END_ID, IM_START, IM_START_ID
from .tiktoken_bpe import _SPECIAL_TO_ID, SPECIAL_TOKENS, _bytes_to_str, _load_bpe, _nfc, _str_to_bytes

#: ChatML template (the Qwen1.5/Qwen2 chat template; Qwen-1 chat uses the same format and default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class QWenTokenizer(PreTrainedTokenizer):
    """The Qwen-1 tokenizer (tiktoken BPE, 151,643 regular tokens + 208 specials = 151,851 ids).

    ``encode``/``__call__``/``tokenize`` NFC-normalize the text and encode it with tiktoken, every special token string
    allowed (the original Qwen-1 behaviour), unless ``split_special_tokens=True`` (then specials are plain text).
    No BOS/EOS is added by ``add_special_tokens``. ``decode(..., skip_special_tokens=True)`` drops every id >= 151643.
    """

    vocab_files_names = {"vocab_file": "qwen.tiktoken"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        errors: str = "replace",
        bos_token: str | AddedToken | None = None,
        eos_token: str | AddedToken | None = ENDOFTEXT,
        unk_token: str | AddedToken | None = None,
        pad_token: str | AddedToken | None = ENDOFTEXT,
        extra_special_tokens: Sequence[str | AddedToken] | dict | None = None,
        chat_template: str | dict | None = CHATML_TEMPLATE,
        **kwargs: Any,
    ):
        self._bpe = _load_bpe(vocab_file)
        self.vocab_file = str(self._bpe.path)
        self.errors = errors
        kwargs.pop("auto_map", None)  # a saved original Qwen-1 config points at remote code we don't ship
        kwargs.pop("extra_vocab_file", None)
        for loader_hint in ("is_local", "local_files_only"):  # from_pretrained hints, not settings worth saving
            kwargs.pop(loader_hint, None)
        if extra_special_tokens is None and "additional_special_tokens" not in kwargs:
            extra_special_tokens = [IM_START, IM_END]
        # Every Qwen special token is an added, special, never-normalized token at its fixed id.
        self._added_tokens_decoder = {
            idx: AddedToken(tok, lstrip=False, rstrip=False, single_word=False, normalized=False, special=True)
            for idx, tok in SPECIAL_TOKENS.items()
        }
        super().__init__(
            errors=errors,
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            extra_special_tokens=extra_special_tokens,
            chat_template=chat_template,
            **kwargs,
        )

    # ---- pickling: the BPE tables are reloaded (from the shared cache) rather than serialized -------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_bpe", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__["_bpe"] = _load_bpe(state["vocab_file"])

    # ---- vocabulary --------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._bpe.n_vocab

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._bpe.str_vocab)
        vocab.update(self._added_tokens_encoder)
        return vocab

    @property
    def eod_id(self) -> int:
        return ENDOFTEXT_ID

    @property
    def im_start_id(self) -> int:
        return IM_START_ID

    @property
    def im_end_id(self) -> int:
        return IM_END_ID

    @property
    def tiktoken_encoding(self):
        """The underlying ``tiktoken.Encoding`` (shared; do not mutate)."""
        return self._bpe.encoding

    def _add_tokens(self, new_tokens: list[str] | list[AddedToken], special_tokens: bool = False) -> int:
        # The tiktoken vocabulary is fixed: only Qwen's own special tokens can be (re-)registered.
        if not new_tokens:
            return 0
        if isinstance(new_tokens, (str, AddedToken)):
            new_tokens = [new_tokens]
        for token in new_tokens:
            content = str(token)
            if content not in _SPECIAL_TO_ID:
                raise ValueError(
                    f"QWenTokenizer cannot add the new token {content!r}: its vocabulary is fixed. Use one of the "
                    f"reserved special tokens <|extra_0|>..<|extra_204|> instead."
                )
            idx = _SPECIAL_TO_ID[content]
            if idx not in self._added_tokens_decoder:
                self._added_tokens_decoder[idx] = AddedToken(content, normalized=False, special=True)
                self._added_tokens_encoder[content] = idx
        self._update_trie()
        self._update_total_vocab_size()
        return 0

    def _convert_token_to_id(self, token: str | bytes) -> int | None:
        if isinstance(token, (bytes, bytearray)):
            return self._bpe.ranks.get(bytes(token))
        if token in _SPECIAL_TO_ID:
            return _SPECIAL_TO_ID[token]
        raw = _str_to_bytes(token)
        return None if raw is None else self._bpe.ranks.get(raw)

    def _convert_token_to_id_with_added_voc(self, token: str | bytes) -> int | None:
        if isinstance(token, str) and token in self._added_tokens_encoder:
            return self._added_tokens_encoder[token]
        return self._convert_token_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        index = int(index)
        if index in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[index]
        token = self._bpe.id_to_bytes.get(index)
        if token is None:
            raise ValueError(f"unknown token id {index} (vocabulary size {self.vocab_size})")
        return _bytes_to_str(token)

    def convert_tokens_to_string(self, tokens: list[str | bytes]) -> str:
        pieces: list[bytes] = []
        for token in tokens:
            if isinstance(token, (bytes, bytearray)):
                pieces.append(bytes(token))
            elif token in _SPECIAL_TO_ID:
                pieces.append(token.encode("utf-8"))
            else:
                raw = _str_to_bytes(token)
                pieces.append(raw if raw is not None else token.encode("utf-8"))
        return b"".join(pieces).decode("utf-8", errors=self.errors)

    # ---- encoding ----------------------------------------------------------------------------------------------------

    def _encode_text(
        self,
        text: str,
        split_special_tokens: bool = False,
        allowed_special: Any = "all",
        disallowed_special: Any = (),
    ) -> list[int]:
        text = _nfc(text)
        if split_special_tokens:
            return self._bpe.encoding.encode_ordinary(text)
        return self._bpe.encoding.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)

    def encode_ordinary(self, texts: str | Iterable[str]) -> list[int] | list[list[int]]:
        """Plain-text ids (NFC, special-token strings as text) for one text or a list of texts."""
        if isinstance(texts, str):
            return self._bpe.encode_ordinary([texts])[0]
        return self._bpe.encode_ordinary(texts)

    def encode_ordinary_i32(self, texts: Iterable[str]) -> list[Any]:
        """:meth:`encode_ordinary` of a list of texts, each as a buffer of native int32 ids (no Python int per id)."""
        return self._bpe.encode_ordinary_i32(texts)

    def tokenize(
        self, text: str, allowed_special: Any = "all", disallowed_special: Any = (), **kwargs: Any
    ) -> list[str]:
        split = kwargs.pop("split_special_tokens", None)
        if split is None:
            split = self.split_special_tokens
        ids = self._encode_text(text, split, allowed_special, disallowed_special)
        return [self._convert_id_to_token(i) for i in ids]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # HF contract: no added/special token handling here.
        return [self._convert_id_to_token(i) for i in self._encode_text(text, split_special_tokens=True)]

    def _encode_plus(
        self,
        text,
        text_pair=None,
        add_special_tokens: bool = True,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors=None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        **kwargs: Any,
    ) -> BatchEncoding:
        if kwargs.pop("return_offsets_mapping", False):
            raise NotImplementedError(
                "return_offsets_mapping is not available with QWenTokenizer (a Python tokenizer); "
                "use a fast tokenizer, e.g. one written by export_qwen2_tokenizer()."
            )
        common = dict(
            add_special_tokens=add_special_tokens,
            truncation_strategy=truncation_strategy,
            max_length=max_length,
            stride=stride,
            return_token_type_ids=return_token_type_ids,
            return_overflowing_tokens=return_overflowing_tokens,
            return_special_tokens_mask=return_special_tokens_mask,
            return_length=return_length,
            verbose=verbose,
        )
        single = isinstance(text, str) and (text_pair is None or isinstance(text_pair, str))
        batch = (
            isinstance(text, (list, tuple))
            and len(text) > 0
            and not is_split_into_words
            and all(isinstance(t, str) for t in text)
            and (
                text_pair is None
                or (
                    isinstance(text_pair, (list, tuple))
                    and len(text_pair) == len(text)
                    and all(isinstance(t, str) for t in text_pair)
                )
            )
        )
        if kwargs.get("sanitize_control_tokens") or not (single or batch):
            # Rare shapes (pre-tokenized words, id lists, nested pairs) and marked chats: the generic path, which
            # still ends in our tokenize()/encode().
            return super()._encode_plus(
                text,
                text_pair=text_pair,
                padding_strategy=padding_strategy,
                is_split_into_words=is_split_into_words,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_tensors=return_tensors,
                return_attention_mask=return_attention_mask,
                **common,
                **kwargs,
            )

        split = kwargs.pop("split_special_tokens", None)
        if split is None:
            split = self.split_special_tokens
        allowed = kwargs.pop("allowed_special", "all")
        disallowed = kwargs.pop("disallowed_special", ())

        def ids_of(t: str | None) -> list[int] | None:
            return None if t is None else self._encode_text(t, split, allowed, disallowed)

        if single:
            return self._prepare(
                ids_of(text),
                ids_of(text_pair),
                padding=padding_strategy.value,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_tensors=return_tensors,
                return_attention_mask=return_attention_mask,
                prepend_batch_axis=True,
                **common,
            )

        pairs = text_pair if text_pair is not None else [None] * len(text)
        batch_outputs: dict[str, list] = {}
        for first, second in zip(text, pairs):
            out = self._prepare(
                ids_of(first),
                ids_of(second),
                padding=PaddingStrategy.DO_NOT_PAD.value,
                pad_to_multiple_of=None,
                padding_side=None,
                return_tensors=None,
                return_attention_mask=False,  # padded (and masked) as a batch below
                **common,
            )
            for key, value in out.items():
                batch_outputs.setdefault(key, []).append(value)
        if return_tensors and return_overflowing_tokens:
            batch_outputs.pop("overflowing_tokens", None)
            batch_outputs.pop("num_truncated_tokens", None)
        batch_outputs = self.pad(
            batch_outputs,
            padding=padding_strategy.value,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
        )
        return BatchEncoding(batch_outputs, tensor_type=return_tensors)

    def _prepare(self, ids, pair_ids, *, truncation_strategy, **kwargs) -> BatchEncoding:
        return self.prepare_for_model(ids, pair_ids=pair_ids, truncation=truncation_strategy.value, **kwargs)

    # ---- decoding ----------------------------------------------------------------------------------------------------

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text = self._bpe.decode(token_ids, skip_special_tokens, errors=errors or self.errors)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    # ---- saving ------------------------------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"vocabulary path ({save_directory}) should be a directory")
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = os.path.join(save_directory, name)
        lines = [
            base64.b64encode(token).decode("ascii") + " " + str(rank) + "\n"
            for token, rank in sorted(self._bpe.ranks.items(), key=lambda kv: kv[1])
        ]
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
        return (path,)
