"""Loading the tokenizer of a checkpoint and encoding plain text for the chat template.

* :func:`load_tokenizer` -- the tokenizer for a checkpoint directory: Qwen-1 directories get :class:`QWenTokenizer`
  (:mod:`qwen_tune.models.qwen1.tokenization_qwen`), everything else (Qwen1.5/2/2.5/3, which ship their own
  ``tokenizer.json``) goes through ``AutoTokenizer``.
* :func:`encode_texts` -- batch-encode pieces of *plain* text for the chat template: no special tokens are added and
  special-token strings typed in the text stay ordinary text (no role injection).

The token constants, :class:`QWenTokenizer` and :func:`export_qwen2_tokenizer` are re-exported for the data layer.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..config import ConfigError, read_json_object
from ..constants import ENDOFTEXT, ENDOFTEXT_ID, IM_END, IM_END_ID, IM_START, IM_START_ID
from ..models.qwen1.convert_tokenizer import export_qwen2_tokenizer
from ..models.qwen1.tiktoken_bpe import EXTRAS, QWEN_PAT_STR, QWEN_TIKTOKEN_PATH, SPECIAL_TOKENS, _nfc
from ..models.qwen1.tokenization_qwen import CHATML_TEMPLATE, QWenTokenizer

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


def load_tokenizer(path: str | os.PathLike | None = None, *, inspect_only: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer for a checkpoint.

    * ``None`` -> :class:`QWenTokenizer` over the bundled ``qwen.tiktoken``.
    * a ``*.tiktoken`` file -> :class:`QWenTokenizer` over it.
    * a directory with ``qwen.tiktoken``, or a ``tokenizer_config.json`` whose ``tokenizer_class`` is ``QWenTokenizer``,
      or a ``config.json`` with ``model_type`` ``"qwen"`` -> :class:`QWenTokenizer` (the directory's ``qwen.tiktoken``
      if present, else the bundled one; other settings from its ``tokenizer_config.json``).
    * anything else -> ``AutoTokenizer.from_pretrained(path)`` (Qwen1.5/2/2.5/3 ship their own tokenizer files).

    ``inspect_only`` (``qwen-tune data ...``: the tokenizer is never saved) loads a Qwen1.5+ ``tokenizer.json`` as
    ``PreTrainedTokenizerFast``: the same tokens, without importing torch; training keeps the checkpoint's own
    class, which its saved ``tokenizer_config.json`` names.

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
