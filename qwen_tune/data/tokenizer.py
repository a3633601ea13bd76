"""Loading the tokenizer of a checkpoint and encoding plain text for the chat template.

* :func:`load_tokenizer` -- the tokenizer for a checkpoint directory: Qwen-1 directories get :class:`QWenTokenizer`
  (:mod:`qwen_tune.models.qwen1.tokenization_qwen`), everything else (Qwen1.5/2/2.5/3, which ship their own
  ``tokenizer.json``) goes through ``AutoTokenizer``.
* :func:`encode_texts` -- batch-encode pieces of *plain* text for the chat template: no special tokens are added and
  special-token strings typed in the text stay ordinary text (no role injection).

The token constants, :class:`QWenTokenizer` and :func:`export_qwen2_tokenizer` are re-exported for the data layer.
transformers (and the classes built on it) load on first use: `qwen-tune data ...` on Qwen-1's ChatML path reads
the vocabulary through tiktoken alone (:class:`QWenTextTokenizer`) and never pays the ~1 s of importing it.
"""

from __future__ import annotations

import os
import re
import sys
import unicodedata
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, read_json_object
from ..constants import ENDOFTEXT, ENDOFTEXT_ID, IM_END, IM_END_ID, IM_START, IM_START_ID
from ..models.qwen1.tiktoken_bpe import (_SPECIAL_TO_ID, EXTRAS, QWEN_PAT_STR, QWEN_TIKTOKEN_PATH, SPECIAL_TOKENS,
                                         Buffer, _load_bpe, _nfc)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..models.qwen1.convert_tokenizer import export_qwen2_tokenizer
    from ..models.qwen1.tokenization_qwen import CHATML_TEMPLATE, QWenTokenizer

# Re-exports that import transformers: resolved on first access (PEP 562), not when this module loads.
_LAZY = {"QWenTokenizer": "tokenization_qwen", "CHATML_TEMPLATE": "tokenization_qwen",
         "export_qwen2_tokenizer": "convert_tokenizer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _LAZY[name] == "tokenization_qwen":
        from ..models.qwen1 import tokenization_qwen as module
    else:
        from ..models.qwen1 import convert_tokenizer as module
    value = getattr(module, name)
    globals()[name] = value
    return value


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
    "QWenTextTokenizer",
    "TokenizerLoadError",
    "load_tokenizer",
    "encode_texts",
    "export_qwen2_tokenizer",
    "is_qwen1_tokenizer",
]


class TokenizerLoadError(OSError):
    """No tokenizer could be loaded from the given path."""


# --------------------------------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path) -> dict:
    """A JSON object used only to sniff the tokenizer kind: unreadable or missing means "says nothing"."""
    try:
        return read_json_object(path, str(path))
    except (OSError, ConfigError):
        return {}


_QWEN1_VOCAB_FILE = "qwen.tiktoken"  # QWenTokenizer.vocab_files_names["vocab_file"]


def _is_qwen1_dir(path: Path) -> bool:
    if (path / _QWEN1_VOCAB_FILE).is_file():
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


# Qwen1.5+ ship a tokenizer.json these classes only wrap: loading it as PreTrainedTokenizerFast gives the same
# tokens without AutoTokenizer, whose config machinery imports torch (seconds of `qwen-tune data ...` start-up).
_QWEN2_FAST_CLASSES = {"Qwen2Tokenizer", "Qwen2TokenizerFast"}


def _is_qwen2_fast_dir(path: Path) -> bool:
    cfg_file = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() or not cfg_file.is_file():
        return False
    return _read_json(cfg_file).get("tokenizer_class") in _QWEN2_FAST_CLASSES


def _load_fast(path: Path) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


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


class QWenTextTokenizer:
    """Qwen-1's vocabulary through tiktoken alone, for reading data on the ChatML path (``qwen-tune data ...``).

    :class:`QWenTokenizer` is a transformers ``PreTrainedTokenizer``, and importing transformers costs more than
    tokenizing a whole small file; the ChatML encoder needs only plain-text ids, the control-token ids and decode,
    which tiktoken gives with the same ids. Never saved and never given to a model: training loads QWenTokenizer.
    """

    chat_template = None  # Qwen-1 checkpoints train on the reference ChatML path
    pad_token, pad_token_id, eos_token, eos_token_id = ENDOFTEXT, ENDOFTEXT_ID, ENDOFTEXT, ENDOFTEXT_ID

    def __init__(self, vocab_file: str | os.PathLike | None = None, name_or_path: str = "") -> None:
        self._bpe = _load_bpe(vocab_file)
        self.vocab_file = str(self._bpe.path)
        self.name_or_path = name_or_path or self.vocab_file

    def __len__(self) -> int:
        return self._bpe.n_vocab

    @property
    def vocab_size(self) -> int:
        return self._bpe.n_vocab

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return _SPECIAL_TO_ID[tokens] if tokens in _SPECIAL_TO_ID else self._bpe.str_vocab.get(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]  # type: ignore[misc]

    def encode_ordinary(self, texts: Sequence[str]) -> list[list[int]]:
        """As :meth:`QWenTokenizer.encode_ordinary`: NFC, special-token strings as text."""
        return self._bpe.encode_ordinary(texts)

    def encode_ordinary_i32(self, texts: Sequence[str]) -> list[Buffer]:
        return self._bpe.encode_ordinary_i32(texts)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._bpe.decode(token_ids, skip_special_tokens)


def is_qwen1_tokenizer(tokenizer: Any) -> bool:
    """A Qwen-1 tokenizer (either class): one that ships no chat template and trains on the ChatML path."""
    if isinstance(tokenizer, QWenTextTokenizer):
        return True
    # A QWenTokenizer exists only once its module is loaded: asking must not import it (and transformers).
    module = sys.modules.get("qwen_tune.models.qwen1.tokenization_qwen")
    return module is not None and isinstance(tokenizer, module.QWenTokenizer)


def load_tokenizer(path: str | os.PathLike | None = None, *, inspect_only: bool = False,
                   text_only: bool = False) -> PreTrainedTokenizerBase | QWenTextTokenizer:
    """Load the tokenizer for a checkpoint.

    * ``None`` -> :class:`QWenTokenizer` over the bundled ``qwen.tiktoken``.
    * a ``*.tiktoken`` file -> :class:`QWenTokenizer` over it.
    * a directory with ``qwen.tiktoken``, or a ``tokenizer_config.json`` whose ``tokenizer_class`` is ``QWenTokenizer``,
      or a ``config.json`` with ``model_type`` ``"qwen"`` -> :class:`QWenTokenizer` (the directory's ``qwen.tiktoken``
      if present, else the bundled one; other settings from its ``tokenizer_config.json``).
    * anything else -> ``AutoTokenizer.from_pretrained(path)`` (Qwen1.5/2/2.5/3 ship their own tokenizer files).

    ``inspect_only`` (``qwen-tune data ...``: the tokenizer is never saved) loads a Qwen1.5+ ``tokenizer.json`` as
    ``PreTrainedTokenizerFast``: the same tokens, without importing torch; training keeps the checkpoint's own
    class, which its saved ``tokenizer_config.json`` names. ``text_only`` (with ``inspect_only``, when the data will
    be rendered as ChatML) loads each Qwen-1 vocabulary above as :class:`QWenTextTokenizer`: without transformers.

    The result always has a pad token (``<|endoftext|>`` when the vocabulary has it, else the EOS token).
    Raises :class:`TokenizerLoadError` (an ``OSError``) naming the path if nothing loads.
    """
    text_only = text_only and inspect_only
    if path is None:
        if text_only:
            return QWenTextTokenizer()
        from ..models.qwen1.tokenization_qwen import QWenTokenizer

        tokenizer: PreTrainedTokenizerBase = QWenTokenizer()
        _ensure_pad_token(tokenizer)
        return tokenizer

    name = os.fspath(path)
    local = Path(name).expanduser()
    try:
        if (local.is_file() and local.suffix == ".tiktoken") or (local.is_dir() and _is_qwen1_dir(local)):
            vocab = local if local.is_file() else local / _QWEN1_VOCAB_FILE
            vocab = vocab if vocab.is_file() else QWEN_TIKTOKEN_PATH
            if text_only:
                return QWenTextTokenizer(vocab, name)
            from ..models.qwen1.tokenization_qwen import QWenTokenizer

            if local.is_file():
                tokenizer = QWenTokenizer(vocab_file=local)
            else:
                kwargs = {} if vocab != QWEN_TIKTOKEN_PATH else {"vocab_file": str(QWEN_TIKTOKEN_PATH)}
                tokenizer = QWenTokenizer.from_pretrained(str(local), **kwargs)
        elif inspect_only and local.is_dir() and _is_qwen2_fast_dir(local):
            tokenizer = _load_fast(local)
        elif local.is_dir():
            from transformers import AutoTokenizer  # imports torch (its config classes do): only when needed

            tokenizer = AutoTokenizer.from_pretrained(str(local))
        elif _looks_like_local_path(name):
            raise FileNotFoundError(f"no such file or directory: {name}")
        else:
            from transformers import AutoTokenizer  # a hub id: downloads anyway, torch's import is no matter

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

    if is_qwen1_tokenizer(tokenizer):
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


def encode_texts_i32(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[Buffer]:
    """:func:`encode_texts` with each text's ids as a buffer of native int32 (what the ChatML encoder joins).

    Qwen-1's tokenizers make them inside tiktoken, with no Python int per token; any other tokenizer's lists are
    converted.
    """
    if is_qwen1_tokenizer(tokenizer) and not isinstance(texts, str):
        return tokenizer.encode_ordinary_i32(texts)
    return [array("i", ids) for ids in encode_texts(tokenizer, texts)]
