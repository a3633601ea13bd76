"""Chat-template text tokenized by tiktoken directly, when the checkpoint's tokenizer is Qwen's own BPE.

Qwen1.5 ... Qwen3 ship a ``tokenizer.json`` whose byte-level BPE is ``qwen.tiktoken``'s ranks. Through the HF
pipeline (added-token matching, NFC, the Split regex, ByteLevel, BPE, offsets) a rendered conversation costs ~5x
tiktoken's ``encode_ordinary`` for the same ids, which made the chat-template path 5x slower than the ChatML one.

The shortcut is taken only when it is verified to give the HF backend's ids exactly (:func:`tiktoken_runs`):

* the BPE model's vocab is ``qwen.tiktoken``'s ranks (byte-level strings, same ids), its options are Qwen's, and
  its merges make HF's merging provably tiktoken's (:func:`_merges_verdict`): released Qwen2/3 files list one merge
  per token, ``export_qwen2_tokenizer`` lists every split; both pass. The check costs ~3 s, so its verdict is
  cached on disk keyed by the content hash of the tokenizer's files (plus the tokenizer class and library
  versions, which decide how those files are loaded);
* normalizer NFC (or none), pre-tokenizer exactly Qwen's Split regex + ByteLevel without a prefix space, offsets
  not trimmed, and added tokens without lstrip/rstrip/single_word, non-special ones matched unnormalized.

Runs are then encoded as the HF backend does with ``encode_special_tokens=True``: added tokens are matched
leftmost-longest over all unnormalized added tokens, special ones skipped (stay text, as in HF, where a skipped
special match also hides an overlapping non-special one), non-special ones become their id; the text between goes
through ``encode_ordinary``. tiktoken does not normalize: a piece that is not NFC is not encoded here (the caller
sends its run through the HF backend).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..constants import cache_root
from ..models.qwen1.tiktoken_bpe import QWEN_PAT_STR, _load_bpe, is_nfc
from .ids import id_bytes

log = logging.getLogger(__name__)
_CACHE_FILE = "bpe_fingerprints.json"
# The exact model options export_qwen2_tokenizer writes (and Qwen's released tokenizer.json has).
_BPE_OPTIONS = dict(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                    byte_fallback=False, ignore_merges=False)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, value: str) -> None:
    """Best effort: a read-only or racing cache only costs the next run the recomputation."""
    try:
        data = _read_cache(path)
        data[key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("could not write %s: %s", path, e)


def _files_key(tokenizer: Any) -> str | None:
    """Content hash of the files the tokenizer was loaded from (None when there are none on disk)."""
    root = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    names = sorted(set((getattr(tokenizer, "vocab_files_names", None) or {}).values()) | {"tokenizer.json"})
    h = hashlib.sha256()
    found = False
    for name in names:
        f = root / name
        if root.is_dir() and f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
            found = True
    if not found:
        return None
    return (f"files:{h.hexdigest()}:{type(tokenizer).__module__}.{type(tokenizer).__qualname__}:"
            f"transformers-{version('transformers')}:tokenizers-{version('tokenizers')}")


def _merges_verdict(model: dict[str, Any]) -> str:
    """'' when HF BPE with this model encodes every piece as tiktoken over qwen.tiktoken does, else why not.

    Accepted: vocab == the ranks; each merge (a, b) has a, b, a+b in the vocab, no pair twice, merges in
    non-decreasing rank of a+b; for every multi-byte token t, the first merge producing t is t's final pair
    (``final_merges``: the last pair tiktoken merges on t's bytes alone, which is the only pair tiktoken ever merges
    into t). Proof, by induction on the steps of one piece, both starting from its single bytes: say the states are
    equal and tiktoken merges (x, y) -> t at position p, t of the lowest rank r present, leftmost. Every listed pair
    present forms a token, so of rank >= r; the listing puts those of rank r (forming t) first, and of them (x, y)
    first; (x, y) is present at p and nowhere left of p (that pair would be leftmost): HF merges (x, y) at p too.
    When tiktoken has no pair left, HF has none either (its pairs form tokens); when HF stops, tiktoken does (its next
    merge would be a listed final pair). Every qwen.tiktoken token is built by BPE, so tiktoken's whole-piece
    shortcut agrees. Other splits listed before the final pair are refused: qwen.tiktoken has tokens with a part
    of higher rank than their own and tokens t = x+y = y+v, so HF could pick (y, v) right of (x, y) and part ways.
    """
    opts = {k: model.get(k) for k in _BPE_OPTIONS}
    if model.get("type") != "BPE" or opts != _BPE_OPTIONS:
        return f"its BPE options {opts} are not Qwen's"
    bpe = _load_bpe(None)
    vocab = bpe.byte_level_vocab
    if model.get("vocab") != vocab:
        return "its BPE vocabulary differs from qwen.tiktoken's"
    first: dict[str, tuple[str, str]] = {}
    seen: set[tuple[str, str]] = set()
    last = -1
    for i, merge in enumerate(model.get("merges") or ()):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge  # older files: "a b" (no byte maps to " ")
        rank = vocab.get(a + b)
        if rank is None or a not in vocab or b not in vocab:
            return f"its merge #{i} {a!r} {b!r} does not join two vocabulary tokens into one"
        if rank < last or (a, b) in seen:
            return f"its merges differ from qwen.tiktoken's (merge #{i} {a!r} {b!r} out of rank order or repeated)"
        last = rank
        seen.add((a, b))
        first.setdefault(a + b, (a, b))
    final = bpe.final_merges
    if sum(len(t) > 1 for t in vocab) != len(final):
        return "qwen.tiktoken has tokens BPE cannot build"
    if first != final:
        bad = next(t for t in final if first.get(t) != final[t])
        return f"its merges differ from qwen.tiktoken's (token {bad!r} is not first built from {final[bad]})"
    return ""


def _model_verdict(tokenizer: Any, backend: Any, cache: Path) -> str:
    key = _files_key(tokenizer)
    hit = _read_cache(cache).get(key) if key else None
    if hit is not None:
        return "" if hit == "ok" else hit
    verdict = _merges_verdict(json.loads(backend.model.__getstate__()))
    if key:
        _write_cache(cache, key, verdict or "ok")
    return verdict


def _pipeline_is_qwen(backend: Any) -> str:
    """'' when normalizer / pre-tokenizer / post-processor are the ones tiktoken reproduces, else why not."""
    norm = json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else None
    if norm not in (None, {"type": "NFC"}):
        return f"normalizer {norm}"
    pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else None
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if not (isinstance(steps, list) and len(steps) == 2
            and steps[0] == {"type": "Split", "pattern": {"Regex": QWEN_PAT_STR}, "behavior": "Isolated",
                             "invert": False}
            and steps[1].get("type") == "ByteLevel" and steps[1].get("add_prefix_space") is False
            and steps[1].get("use_regex") is False):
        return f"pre-tokenizer {pre}"
    post = json.loads(backend.post_processor.__getstate__()) if backend.post_processor is not None else None
    if post is not None and not (post.get("type") == "ByteLevel" and post.get("trim_offsets") is False):
        return f"post-processor {post}"  # trimmed offsets would move label boundaries
    return ""


class TiktokenRuns:
    """Encodes runs of rendered text (between the template's control tokens) as the HF backend would."""

    def __init__(self, added: dict[str, tuple[int, bool]], n_ranks: int) -> None:
        bpe = _load_bpe(None)
        # tiktoken's core as the ChatML path calls it (surrogate fallback kept), on NFC runs: int32 buffers
        self._encode_i32 = bpe.encode_ordinary_i32
        contents = sorted(added, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._added = {c: (None if special else tid) for c, (tid, special) in added.items()}
        # Bytes per token id, for offsets: tiktoken is lossless, added tokens are their content verbatim.
        top = max([n_ranks - 1] + [tid for tid, _ in added.values()])
        nbytes = [0] * (top + 1)
        for tid, token in bpe.id_to_bytes.items():
            nbytes[tid] = len(token)
        for c, (tid, _) in added.items():
            nbytes[tid] = len(c.encode("utf-8"))
        self._nbytes = nbytes
        self._cache: dict[str, bytes] = {}  # short runs repeat: role headers, "\n", the default system

    def encode(self, run: str) -> bytes | None:
        """The run's ids as int32 bytes (:mod:`.ids`), or None when a piece is not NFC (HF would normalize it;
        tiktoken cannot)."""
        return self.encode_many([run])[0]

    def encode_many(self, runs: list[str]) -> list[bytes | None]:
        """:meth:`encode` of each run; the plain runs not cached go to tiktoken in one call."""
        cache, added = self._cache, self._added_re
        out: list[bytes | None] = []
        todo: list[int] = []
        if len(cache) >= 4096:
            cache.clear()
        for k, run in enumerate(runs):
            ids = cache.get(run) if len(run) <= 256 else None  # hashing a long run once costs more than it saves
            if ids is None:
                if added is not None and added.search(run):
                    ids = self._encode_with_added(run)
                    if ids is not None and len(run) <= 256:
                        cache[run] = ids
                elif is_nfc(run):
                    todo.append(k)
            out.append(ids)
        for k, buf in zip(todo, self._encode_i32([runs[k] for k in todo])):
            out[k] = ids = bytes(buf)
            if len(runs[k]) <= 256:
                cache[runs[k]] = ids
        return out

    def _encode_with_added(self, run: str) -> bytes | None:
        parts: list[Any] = []
        last = 0
        for m in self._added_re.finditer(run):  # type: ignore[union-attr]
            tid = self._added[m.group(0)]
            if tid is None:  # a special token: plain text here, as in HF with encode_special_tokens
                continue
            if m.start() > last:
                parts.append(run[last:m.start()])
            parts.append(tid)
            last = m.end()
        if last < len(run):
            parts.append(run[last:])
        texts = [p for p in parts if type(p) is str]
        if not all(map(is_nfc, texts)):
            return None
        encoded = iter(self._encode_i32(texts))
        return b"".join(next(encoded) if type(p) is str else id_bytes(p) for p in parts)

    def offsets(self, run: str, ids: Sequence[int]) -> Iterator[tuple[int, int]]:
        """Char offsets of each token in the run, as HF reports them: a token holding part of a character
        spans that whole character. Lazy: a label walk stops at the first token past a span boundary."""
        nbytes = self._nbytes
        if run.isascii():
            pos = 0
            for t in ids:
                n = nbytes[t]
                yield pos, pos + n
                pos += n
            return
        ci = 0  # the char holding byte `cb` (its first byte)
        cb = 0
        bpos = 0
        for t in ids:
            start, bpos = bpos, bpos + nbytes[t]
            while cb + len(run[ci].encode("utf-8")) <= start:
                cb += len(run[ci].encode("utf-8"))
                ci += 1
            s = ci
            cj, cbj = ci, cb
            while cbj + len(run[cj].encode("utf-8")) < bpos:
                cbj += len(run[cj].encode("utf-8"))
                cj += 1
            yield s, cj + 1


def tiktoken_runs(tokenizer: Any) -> tuple[TiktokenRuns | None, str]:
    """The tiktoken run encoder for this tokenizer, or None and why it is not Qwen's BPE exactly."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, "no fast backend"
    try:
        reason = _pipeline_is_qwen(backend)
        if reason:
            return None, reason
        added: dict[str, tuple[int, bool]] = {}
        n_ranks = len(_load_bpe(None).ranks)
        for tid, tok in backend.get_added_tokens_decoder().items():
            if tid < n_ranks:
                return None, f"added token {tok.content!r} has a regular vocabulary id {tid}"
            if tok.special:
                if not tok.normalized:
                    added[tok.content] = (tid, True)
                continue
            if tok.lstrip or tok.rstrip or tok.single_word or tok.normalized:
                return None, f"added token {tok.content!r} has lstrip/rstrip/single_word/normalized set"
            added[tok.content] = (tid, False)
        cache = cache_root() / _CACHE_FILE
        reason = _model_verdict(tokenizer, backend, cache)
        if reason:
            return None, reason
    except (OSError, ValueError, AttributeError, TypeError) as e:  # an unusual backend: the HF path is exact
        return None, f"cannot inspect the tokenizer ({type(e).__name__}: {e})"
    return TiktokenRuns(added, n_ranks), ""
