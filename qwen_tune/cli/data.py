"""`qwen-tune data check|tokenize|preview`: see exactly what the model will be trained on."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from ..constants import IGNORE_INDEX

if TYPE_CHECKING:
    from ..data.formats import Conversation
    from ..data.report import DataReport
    from ..data.template import EncodedSample

# The data modules (datasets, transformers' tokenizers and Jinja) are imported inside the commands: building the
# parser for `qwen-tune --help` must not pay for them.


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="inspect, validate and tokenize conversation data")
    dsub = p.add_subparsers(dest="data_cmd", required=True)

    def common(q: argparse.ArgumentParser, max_len: int = 512) -> None:
        q.add_argument("--max-len", type=int, default=max_len, help="model_max_length (default %(default)s)")
        q.add_argument("--template", default="auto",
                       help="auto | chatml | checkpoint | FILE.jinja (default %(default)s: the checkpoint's "
                            "chat_template when it has one, else Qwen-1's ChatML)")
        q.add_argument("--mask", choices=["auto", "reference", "assistant_only"], default="auto",
                       help="auto = reference on ChatML, assistant_only with a chat template")
        q.add_argument("--system", default=None, help="default system prompt (default: the template's own)")
        q.add_argument("--enable-thinking", choices=["true", "false"], default=None,
                       help="passed to templates that take it (Qwen3, Qwen3.5)")
        q.add_argument("--model", default=None, help="checkpoint dir whose tokenizer to use (default: bundled Qwen)")
        q.add_argument("--format", default="auto", choices=["auto", "qwen", "sharegpt", "openai", "alpaca"])
        q.add_argument("--truncation", choices=["cut", "drop"], default="cut")
        q.add_argument("--strict", action="store_true", help="stop at the first bad record")
        q.add_argument("--columns", default=None, metavar="NAME=KEY,...",
                       help="custom column names, as data.columns: e.g. prompt=instruction_text,response=output_text")

    c = dsub.add_parser("check", help="format, counts, length histogram, truncation/drop report")
    c.add_argument("files", nargs="+")
    c.add_argument("--all", action="store_true", help="list every invalid / dropped record, not the first 3 per reason")
    c.add_argument("--errors", default=None, metavar="FILE",
                   help="write every invalid / dropped record as JSONL to FILE (e.g. data_errors.jsonl)")
    common(c)
    c.set_defaults(func=cmd_check)

    t = dsub.add_parser("tokenize", help="write {id, input_ids, labels} per kept sample as JSONL")
    t.add_argument("--data", required=True, nargs="+")
    t.add_argument("--out", required=True)
    common(t)
    t.set_defaults(func=cmd_tokenize)

    v = dsub.add_parser("preview", help="print rendered samples with trained spans highlighted",
                           description="Print rendered samples: on a terminal trained spans are green and ignored "
                                       "ones dim; piped or redirected, the text is plain and unwrapped, trained "
                                       f"spans wrapped in {TRAINED_OPEN} {TRAINED_CLOSE}.")
    v.add_argument("file")
    v.add_argument("-n", type=int, default=3, help="how many samples (default %(default)s)")
    common(v, max_len=8192)
    v.set_defaults(func=cmd_preview)


@dataclass
class Encoded:
    report: DataReport
    formats: dict[str, str] = field(default_factory=dict)
    convs: list[Conversation] = field(default_factory=list)
    samples: list[EncodedSample] = field(default_factory=list)
    tokenizer: object = None


def _encoder(args: argparse.Namespace, tokenizer: object, max_len: int) -> object:
    from ..data.chat_template import make_encoder

    kwargs = {} if args.enable_thinking is None else {"enable_thinking": args.enable_thinking == "true"}
    return make_encoder(tokenizer, max_len, template=args.template, mask=args.mask, system_prompt=args.system,
                        truncation=args.truncation, template_kwargs=kwargs, origin=args.model)


def _columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    from ..config import ConfigError

    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 for p in pairs):
        raise ConfigError(f"--columns {text!r}: expected NAME=KEY pairs separated by commas")
    return {k.strip(): v.strip() for k, v in pairs}


def encode_files(files: list[str], args: argparse.Namespace) -> Encoded:
    from ..config import ConfigError, DatasetSpec
    from ..data.dataset import load_conversations
    from ..data.formats import detect_file_format
    from ..data.report import DataReport
    from ..data.tokenizer import load_tokenizer

    # A Qwen-1 vocabulary renders as ChatML unless a .jinja file is given: tiktoken alone does, no transformers.
    tokenizer = load_tokenizer(args.model, inspect_only=True, text_only=args.template in ("auto", "chatml", "checkpoint"))
    encoder = _encoder(args, tokenizer, args.max_len)
    out = Encoded(DataReport("data", template=encoder.name), tokenizer=tokenizer)
    for f in files:
        try:
            spec = DatasetSpec(path=f, format=args.format, columns=_columns(args.columns))
        except ValueError as e:  # pydantic's ValidationError: an unknown column name
            raise ConfigError(f"--columns {args.columns!r}: names are LLaMA-Factory's columns (prompt, query, "
                              f"response, history, system, messages, tools, chosen, rejected): "
                              f"{str(e).splitlines()[-2].strip()[:120] if str(e).count(chr(10)) else e}") from None
        if spec.format == "auto":
            from ..data.dataset import iter_raw_records

            out.formats[f] = detect_file_format(iter_raw_records(spec))
            spec.format = out.formats[f]  # type: ignore[assignment]
        else:
            out.formats[f] = spec.format
        out.convs += load_conversations(spec, out.report, args.strict)
    for c in out.convs:
        out.report.ignored.update(c.ignored)
    out.samples = encoder.encode(out.convs)
    for s in out.samples:
        out.report.ignored.update(s.notes)
        out.report.truncated += s.truncated
        if s.drop_reason:
            out.report.add_drop(s.drop_reason, f"id={s.id!r}", s.id)
        else:
            out.report.kept += 1
    return out


def _percentile(sorted_vals: list[int], q: float) -> int:
    if not sorted_vals:
        return 0
    return sorted_vals[min(len(sorted_vals) - 1, int(round(q * (len(sorted_vals) - 1))))]


def cmd_check(args: argparse.Namespace) -> int:
    enc = encode_files(args.files, args)
    for f, fmt in enc.formats.items():
        print(f"{f}: format {fmt}")
    print(f"template: {enc.report.template}")
    # Lengths before truncation tell how much max_len cuts.
    full = _encoder(args, enc.tokenizer, 10**9)
    lengths = sorted(len(s.input_ids) for s in full.encode(enc.convs) if s.input_ids)
    turns = sum(len(c.turns) for c in enc.convs)
    kept = [s for s in enc.samples if not s.drop_reason]
    trained = sum(sum(1 for t in s.labels[1:] if t != IGNORE_INDEX) for s in kept)
    print(f"samples: {len(enc.convs)} valid, turns: {turns}, tokens (before truncation): {sum(lengths)}, "
          f"after: {sum(len(s.input_ids) for s in kept)}, trained label tokens: {trained}")
    if lengths:
        print(f"length p50 {_percentile(lengths, .5)}  p90 {_percentile(lengths, .9)}  "
              f"p99 {_percentile(lengths, .99)}  max {lengths[-1]}  (max_len {args.max_len})")
        edges = [0, 128, 256, 512, 1024, 2048, 4096, 8192, 10**9]
        for lo, hi in zip(edges, edges[1:]):
            n = sum(lo < x <= hi for x in lengths)
            if n:
                label = f"{lo + 1}-{hi}" if hi < 10**9 else f">{lo}"
                print(f"  {label:>11} {n:6d} {'#' * max(1, round(40 * n / len(lengths)))}")
    over = sum(x > args.max_len for x in lengths)
    print(f"over max_len: {over} ({'dropped' if args.truncation == 'drop' else 'tail-truncated'})")
    print("\n".join(enc.report.lines(all_locations=args.all)))
    if args.errors:
        from ..data.report import write_errors

        n = write_errors(args.errors, [enc.report])
        print(f"wrote {n} invalid / dropped record locations to {args.errors}")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    enc = encode_files(args.data, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for s in enc.samples:
            if not s.drop_reason:
                fh.write(json.dumps({"id": s.id, "input_ids": s.input_ids, "labels": s.labels}) + "\n")
    print(enc.report, file=sys.stderr)
    print(f"wrote {enc.report.kept} samples to {out}", file=sys.stderr)
    return 0


# Trained spans when stdout is not a terminal (a pipe, a file, a pager without colour): brackets that survive
# any viewer, and that no tokenizer output contains in practice.
TRAINED_OPEN, TRAINED_CLOSE = "\u27e6", "\u27e7"


def _runs(tokenizer: object, s: EncodedSample) -> list[tuple[str, bool]]:
    """(text, trained) runs; same-status tokens are decoded together so multi-byte characters stay whole."""
    runs, start = [], 0
    for i in range(1, len(s.input_ids) + 1):
        if i == len(s.input_ids) or (s.labels[i] != IGNORE_INDEX) != (s.labels[start] != IGNORE_INDEX):
            runs.append((tokenizer.decode(s.input_ids[start:i]), s.labels[start] != IGNORE_INDEX))
            start = i
    return runs


def cmd_preview(args: argparse.Namespace) -> int:
    enc = encode_files([args.file], args)
    shown = enc.samples[: args.n]
    heads = [f"── id={s.id} tokens={len(s.input_ids)}" + (" TRUNCATED" if s.truncated else "")
             + (f" DROPPED: {s.drop_reason}" if s.drop_reason else "") for s in shown]
    if not sys.stdout.isatty():
        print(f"template: {enc.report.template}")
        print(f"{TRAINED_OPEN}...{TRAINED_CLOSE} = trained (label kept), everything else = ignored (-100)")
        for head, s in zip(heads, shown):
            print(head)
            print("".join(f"{TRAINED_OPEN}{t}{TRAINED_CLOSE}" if trained else t for t, trained in _runs(enc.tokenizer, s)))
        print("\n".join(enc.report.lines()))
        return 0
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False)
    console.print(f"template: {enc.report.template}", markup=False)
    console.print("[bold green]green[/] = trained (label kept), [dim]dim[/] = ignored (-100)")
    for head, s in zip(heads, shown):
        console.print(head, style="bold", markup=False)  # ids like "[data]" are text, not rich markup
        text = Text()
        for piece, trained in _runs(enc.tokenizer, s):
            text.append(piece, style="bold green" if trained else "dim")
        console.print(text)
    console.print("\n".join(enc.report.lines()), markup=False)
    return 0
