"""From recipe data specs to tokenized `datasets.Dataset`s, validated, mixed, split and cached.

Validation runs first, in the main process, so every bad record is reported with its location.
Tokenization runs through `datasets.map` (optionally with several processes) and the result
is cached on disk under a key made of the data content, tokenizer, template, masking mode and
max length, so a second run with the same inputs skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from ..config import ConfigError, DataConfig, DatasetSpec
from ..constants import cache_root
from .formats import (Conversation, DataError, RawRecord, detect_file_format, list_data_files, read_records,
                      remap_columns, to_conversation)
from .report import DataReport
from .chat_template import make_encoder
from .template import TEMPLATE_VERSION

if TYPE_CHECKING:
    import datasets

# `datasets` (pyarrow, pandas: ~1 s) is imported by the functions that use it, not here: `qwen-tune data ...`
# reads local files through load_conversations and never needs it.

log = logging.getLogger(__name__)
COLUMNS = ["id", "input_ids", "labels", "length"]


@dataclass
class PreparedData:
    train: datasets.Dataset | datasets.IterableDataset
    eval: datasets.Dataset | None
    reports: list[DataReport] = field(default_factory=list)
    cache_path: Path | None = None
    from_cache: bool = False


def default_cache_dir() -> Path:
    return cache_root()


# ---------------------------------------------------------------- reading + validation

def _is_hf_dataset(spec: DatasetSpec) -> bool:
    return not Path(spec.path).exists() or (Path(spec.path) / "dataset_info.json").exists() \
        or (Path(spec.path) / "state.json").exists()


def looks_like_path(name: str) -> bool:
    """A name no Hub dataset can have (./x, ../x, /x, ~/x, x.json, a/b/c): a missing local path, not a Hub id."""
    if name.startswith(("./", "../", "/", "~", ".\\")) or Path(name).suffix.lower() in (
            ".json", ".jsonl", ".txt", ".csv", ".parquet", ".arrow", ".yaml", ".yml", ".gz", ".zst"):
        return True
    return name.replace(os.sep, "/").count("/") > 1 or (os.sep != "/" and os.sep in name)


def iter_raw_records(spec: DatasetSpec) -> Iterator[RawRecord]:
    """Records of a local file/directory, or rows of an HF dataset (hub name or save_to_disk dir)."""
    if spec.columns:
        for rec in _iter_raw(spec):
            rec.value = remap_columns(rec.value, spec.columns, spec.format)
            yield rec
        return
    yield from _iter_raw(spec)


def _iter_raw(spec: DatasetSpec) -> Iterator[RawRecord]:
    if not _is_hf_dataset(spec):
        for f in list_data_files(spec.path):
            yield from read_records(f)
        return
    import datasets

    p = Path(spec.path)
    if p.exists():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[spec.split]
    else:
        if looks_like_path(spec.path):
            raise DataError(spec.path, "missing_file", "no such data file or directory (not looked up on the Hub: "
                            "a Hub dataset is named org/name)")
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # datasets reads its own switch, then retries for 30 s
        try:
            ds = datasets.load_dataset(spec.path, spec.name, split=spec.split)
        except Exception as e:  # noqa: BLE001 - surfaced as a located, readable error
            raise DataError(spec.path, "missing_dataset",
                            f"not a local file/directory and could not be loaded as a HF dataset: "
                            f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
    for i, row in enumerate(ds):
        yield RawRecord(spec.path, i, row)


def load_conversations(spec: DatasetSpec, report: DataReport, strict: bool = False) -> list[Conversation]:
    """Validate every record of one dataset; bad ones are counted (or raised when strict)."""
    fmt = spec.format
    if spec.format == "auto":
        fmt = detect_file_format(iter_raw_records(spec))
    convs = validate_records(spec, lambda rec: to_conversation(rec, fmt), report, strict)  # type: ignore[arg-type]
    for conv in convs:
        report.ignored.update(conv.ignored)
    return convs


def validate_records(spec: DatasetSpec, convert: Callable[[RawRecord], Any], report: DataReport,
                     strict: bool = False) -> list[Any]:
    """Every record of one dataset through `convert` (to a Conversation, or a preference Pair); a bad one is
    located and counted in `report` (raised when strict), so read = kept + invalid."""
    out = []
    for rec in iter_raw_records(spec):
        report.records += 1
        try:
            item = convert(rec)
        except DataError as e:
            if strict:
                raise
            report.add_error(e)
            continue
        report.leading_assistant_dropped += item.dropped_leading_assistant
        out.append(item)
    return out


def mix(groups: list[tuple[DatasetSpec, list[Conversation]]], seed: int) -> list[Conversation]:
    """Concatenate datasets, each scaled by its weight (deterministic for a seed)."""
    rng = random.Random(seed)
    out: list[Conversation] = []
    for spec, convs in groups:
        whole, frac = divmod(spec.weight, 1.0)
        out += convs * int(whole)
        extra = int(round(frac * len(convs)))
        if extra:
            out += rng.sample(convs, extra)
    return out


def split_eval(groups: list[tuple[DatasetSpec, list[Conversation]]], ratio: float, seed: int
               ) -> tuple[list[tuple[DatasetSpec, list[Conversation]]], list[Conversation]]:
    """Hold out `ratio` of the unique records (before weighting), so no copy of an eval sample is trained on."""
    pool = [(g, i) for g, (_, convs) in enumerate(groups) for i in range(len(convs))]
    random.Random(seed).shuffle(pool)
    n_eval = max(1, math.floor(len(pool) * ratio))
    held = set(pool[:n_eval])
    eval_convs = [groups[g][1][i] for g, i in pool[:n_eval]]
    rest = [(spec, [c for i, c in enumerate(convs) if (g, i) not in held]) for g, (spec, convs) in enumerate(groups)]
    return rest, eval_convs


# ---------------------------------------------------------------- tokenization + cache

def _file_digest(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256(f"{type(tokenizer).__name__}:{len(tokenizer)}".encode())
    vocab_file = getattr(tokenizer, "vocab_file", None)
    root = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    for f in [Path(vocab_file)] if vocab_file else [root / "tokenizer.json", root / "qwen.tiktoken"]:
        if f.is_file():
            _file_digest(f, h)
            break
    return h.hexdigest()[:16]


def cache_key(cfg: DataConfig, tokenizer: Any, seed: int, template: str = "") -> str:
    h = hashlib.sha256()
    for spec in cfg.datasets + cfg.eval_datasets:
        h.update(spec.model_dump_json().encode())
        if not _is_hf_dataset(spec):
            for f in list_data_files(spec.path):
                _file_digest(f, h)
        elif Path(spec.path).exists():  # save_to_disk dir: its state.json carries the fingerprint
            for f in sorted(Path(spec.path).rglob("state.json")):
                _file_digest(f, h)
    params = dict(v=TEMPLATE_VERSION, tok=tokenizer_fingerprint(tokenizer), max_len=cfg.max_len, mask=cfg.mask,
                  system=cfg.system_prompt, trunc=cfg.truncation, ratio=cfg.eval_split_ratio, seed=seed,
                  strict=cfg.strict, template=template, template_kwargs=cfg.template_kwargs,
                  split="unique-before-weight")
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _encode_batch(batch: dict[str, list], encoder: Any) -> dict[str, list]:
    extra = batch.get("extra") or [""] * len(batch["id"])
    convs = [Conversation.from_row(i, s, r, t, x) for i, s, r, t, x in
             zip(batch["id"], batch["system"], batch["roles"], batch["texts"], extra)]
    enc = encoder.encode(convs)
    # int32 arrays, which Arrow takes without unboxing an int per token (views of the ChatML encoder's bytes).
    arrays = [e.arrays() for e in enc]
    return {"id": [e.id for e in enc], "input_ids": [a[0] for a in arrays], "labels": [a[1] for a in arrays],
            "length": [e.length for e in enc], "truncated": [e.truncated for e in enc],
            "drop_reason": [e.drop_reason for e in enc],
            # One string per row: an all-empty list column would get Arrow's null type in some batches.
            "notes": [",".join(e.notes) for e in enc]}


def tokenize(convs: list[Conversation], encoder: Any, report: DataReport, num_proc: int = 1) -> datasets.Dataset:
    """Tokenize with `datasets.map`, count truncations and drops into `report`, return the kept rows."""
    import datasets

    raw = datasets.Dataset.from_list([c.to_dict() for c in convs]) if convs else \
        datasets.Dataset.from_dict({"id": [], "system": [], "roles": [], "texts": [], "extra": []})
    ds = raw.map(_encode_batch, fn_kwargs={"encoder": encoder}, batched=True, batch_size=512,
                 num_proc=num_proc if num_proc > 1 and len(raw) > 1024 else None,
                 remove_columns=raw.column_names, new_fingerprint=f"qt-{id(encoder)}-{len(raw)}",
                 desc=f"Tokenizing {report.name}")
    reasons = ds["drop_reason"]
    report.truncated += sum(ds["truncated"])
    report.template = encoder.name
    for notes in ds["notes"]:
        report.ignored.update(notes.split(",") if notes else [])
    ids = ds["id"]
    for r, i in zip(reasons, ids):
        if r:
            report.add_drop(r, f"id={i!r}", i)
    keep = [k for k, r in enumerate(reasons) if not r]
    report.kept += len(keep)
    return ds.select(keep).select_columns(COLUMNS)


def cached_data(cfg: DataConfig, tokenizer: Any, seed: int, template_id: str,
                use_cache: bool) -> tuple[Path, PreparedData | None]:
    """The cache directory for this data + tokenizer + template, and what it holds when complete (else None)."""
    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    cached = root / "tokenized" / cache_key(cfg, tokenizer, seed, template_id)
    if not (use_cache and (cached / "done.json").exists()):
        return cached, None
    import datasets

    meta = json.loads((cached / "done.json").read_text())
    train = datasets.load_from_disk(str(cached / "train"))
    eval_ds = datasets.load_from_disk(str(cached / "eval")) if (cached / "eval").exists() else None
    return cached, PreparedData(train, eval_ds, [_report_from_dict(r) for r in meta["reports"]], cached, True)


def prepare_data(cfg: DataConfig, tokenizer: Any, seed: int = 42, use_cache: bool = True) -> PreparedData:
    """Everything between data specs in a recipe and the datasets the Trainer consumes."""
    if not cfg.datasets:
        raise DataError("<recipe>", "no_data", "no training data: set data.path or data.datasets")
    encoder = make_encoder(tokenizer, cfg.max_len, template=cfg.template, mask=cfg.mask,
                           system_prompt=cfg.system_prompt, truncation=cfg.truncation,
                           template_kwargs=cfg.template_kwargs)
    log.info("data: chat template %s, labels %s", encoder.name, encoder.mask)
    if cfg.streaming:
        return _prepare_streaming(cfg, encoder, seed)
    cached, hit = cached_data(cfg, tokenizer, seed, encoder.template_id, use_cache)
    if hit is not None:
        return hit

    train_report = DataReport("train")
    groups = [(s, load_conversations(s, train_report, cfg.strict)) for s in cfg.datasets]
    eval_convs: list[Conversation] = []
    reports = [train_report]
    if cfg.eval_datasets:
        eval_report = DataReport("eval")
        reports.append(eval_report)
        eval_convs = mix([(s, load_conversations(s, eval_report, cfg.strict)) for s in cfg.eval_datasets], seed)
    elif cfg.eval_split_ratio > 0 and sum(len(c) for _, c in groups) > 1:
        groups, eval_convs = split_eval(groups, cfg.eval_split_ratio, seed)
        reports.append(DataReport("eval"))
    train_convs = mix(groups, seed)
    train = tokenize(train_convs, encoder, train_report, cfg.num_proc)
    eval_ds = tokenize(eval_convs, encoder, reports[1], cfg.num_proc) if len(reports) > 1 else None
    if len(train) == 0:
        raise DataError(", ".join(s.path for s in cfg.datasets), "no_samples",
                        "no usable training sample left:\n" + str(train_report))
    if use_cache:
        _save_cache(cached, train, eval_ds, reports)
    return PreparedData(train, eval_ds, reports, cached if use_cache else None, False)


def _save_cache(path: Path, train: datasets.Dataset, eval_ds: datasets.Dataset | None, reports: list[DataReport]) -> None:
    # Written to a temp dir then renamed, so a killed run never leaves a half cache behind.
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        train.save_to_disk(str(tmp / "train"))
        if eval_ds is not None:
            eval_ds.save_to_disk(str(tmp / "eval"))
        (tmp / "done.json").write_text(json.dumps({"reports": [r.to_dict() for r in reports]}))
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only cache dir must not stop training
        log.warning("could not write the tokenized-data cache at %s: %s", path, e)


def _report_from_dict(d: dict[str, Any]) -> DataReport:
    from collections import Counter

    r = DataReport(d["name"], d["records"], d["kept"], d["truncated"], d["leading_assistant_dropped"],
                   Counter(d["skipped"]), Counter(d["dropped"]), d["examples"])
    r.template, r.ignored = d.get("template", ""), Counter(d.get("ignored", {}))
    r.locations = d.get("locations", [])
    return r


def _prepare_streaming(cfg: DataConfig, encoder: Any, seed: int) -> PreparedData:
    """Training data read lazily; eval data (small by nature) tokenized up front like in the in-memory mode."""
    weighted = [f"{s.path} (weight {s.weight:g})" for s in cfg.datasets if s.weight != 1.0]
    if weighted:
        # A weight means "this many passes" over a dataset whose length streaming never knows up front.
        raise ConfigError(f"data.streaming: dataset weights need the in-memory mode: {', '.join(weighted)}; "
                          "set data.streaming=false or remove the weights")
    if cfg.eval_split_ratio > 0:
        raise ConfigError("data.streaming: eval_split_ratio needs the in-memory mode; give the held-out data as "
                          "data.eval_path (or data.eval_datasets) instead, or set data.streaming=false")
    reports = [DataReport("train (streaming)", template=encoder.name)]
    eval_ds = None
    if cfg.eval_datasets:
        reports.append(DataReport("eval", template=encoder.name))
        convs = mix([(s, load_conversations(s, reports[1], cfg.strict)) for s in cfg.eval_datasets], seed)
        eval_ds = tokenize(convs, encoder, reports[1], cfg.num_proc)
    return PreparedData(_streaming_dataset(cfg, encoder), eval_ds, reports)


def _streaming_dataset(cfg: DataConfig, encoder: Any) -> datasets.IterableDataset:
    """Lazy mode for data larger than memory: records are validated and encoded as they are read."""
    import datasets

    def gen(specs: list[dict]) -> Iterable[dict]:
        for s in specs:
            spec = DatasetSpec(**s)
            fmt = spec.format if spec.format != "auto" else detect_file_format(iter_raw_records(spec))
            batch: list[Conversation] = []
            for rec in iter_raw_records(spec):
                try:
                    batch.append(to_conversation(rec, fmt))  # type: ignore[arg-type]
                except DataError as e:
                    if cfg.strict:
                        raise
                    log.warning("skipped %s", e)
                if len(batch) == 256:
                    yield from _kept(encoder.encode(batch))
                    batch = []
            yield from _kept(encoder.encode(batch))

    return datasets.IterableDataset.from_generator(gen, gen_kwargs={"specs": [s.model_dump() for s in cfg.datasets]})


def _kept(samples: Iterable[Any]) -> Iterator[dict]:
    for e in samples:
        if e.drop_reason:
            log.warning("dropped id=%r: %s", e.id, e.drop_reason)
            continue
        yield {"id": e.id, "input_ids": e.input_ids, "labels": e.labels, "length": len(e.input_ids)}
