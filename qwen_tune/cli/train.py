"""`qwen-tune train` and `qwen-tune recipes`."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

# config (pydantic, YAML) and the training stack load inside the commands: `qwen-tune --help` builds this parser.


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a Qwen model from a YAML recipe",
                       description="Fine-tune from a recipe; trailing key.sub=value items override it.")
    p.add_argument("--recipe", required=True, help="recipe file, or a bundled recipe name (see `qwen-tune recipes`)")
    p.add_argument("--nproc", type=int, default=None, help="launch N processes on this machine through torchrun")
    p.add_argument("overrides", nargs="*", help="e.g. training.lr=1e-4 output.dir=outputs/x, or as flags "
                   "(--training.lr 1e-4), undotted where the key is unique (lora_r=8), and Qwen's finetune.py flags "
                   "(--model_max_length 512 --lora_r 8 ...); a `--` before them is optional")
    p.set_defaults(func=cmd_train)
    r = sub.add_parser("recipes", help="list bundled recipes")
    r.set_defaults(func=cmd_recipes)


# `train`'s own options (True: takes a value). Every other token after `train` is an override: no recipe key or
# finetune.py flag is named recipe, nproc or help, so the split is unambiguous.
_OWN_OPTIONS = {"--recipe": True, "--nproc": True, "--help": False, "-h": False}
_GLOBAL_FLAGS = ("--verbose", "-v")


def _own_option(token: str) -> str | None:
    name = token.partition("=")[0]
    if name in _OWN_OPTIONS:
        return name
    # argparse accepts unambiguous prefixes (`--rec tiny`)
    matches = [o for o in _OWN_OPTIONS if o.startswith("--") and len(name) > 3 and o.startswith(name)]
    return matches[0] if len(matches) == 1 else None


def route_overrides(argv: list[str]) -> list[str]:
    """`train --recipe r --lora_r 8 x.y=1` -> `train --recipe r -- --lora_r 8 x.y=1`, so overrides given as flags
    need no `--` (argparse would reject them as unknown options). Other commands pass through unchanged."""
    cmd = next((i for i, t in enumerate(argv) if not t.startswith("-")), None)
    if cmd is None or argv[cmd] != "train":
        return argv
    own: list[str] = []
    moved: list[str] = []  # `qwen-tune train ... --verbose`: the global flag, wherever it is written
    rest: list[str] = []
    tokens = iter(argv[cmd + 1:])
    for tok in tokens:
        if tok == "--":
            rest += list(tokens)
        elif tok in _GLOBAL_FLAGS:
            moved.append(tok)
        elif (name := _own_option(tok)) is not None:
            own.append(tok)
            value = next(tokens, None) if _OWN_OPTIONS[name] and "=" not in tok else None
            own += [value] if value is not None else []
        else:
            rest.append(tok)
    return [*argv[:cmd], *moved, "train", *own, *(["--", *rest] if rest else [])]


def cmd_recipes(args: argparse.Namespace) -> int:
    from ..config import list_recipes

    for name, about in list_recipes():
        print(f"{name:18s} {about}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import load_recipe  # heavy imports stay inside commands: `qwen-tune --help` must start fast
    from .finetune_args import convert

    args.overrides, notes = convert(args.overrides)
    for note in notes:
        print(note, file=sys.stderr)
    recipe = load_recipe(args.recipe, args.overrides)  # validate before spawning anything
    from ..train.preflight import check_before_launch

    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        check_before_launch(recipe)  # one line here, rather than one per rank plus the launcher's traceback
        cmd = launch_command(args.nproc, args.recipe, args.overrides)
        print("launching:", " ".join(cmd), file=sys.stderr)
        return subprocess.call(cmd)
    from .auto_settings import resolve_gradient_checkpointing

    recipe, why = resolve_gradient_checkpointing(recipe)
    if why and int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger("qwen_tune").info(why)  # with the run's other log lines (stderr stays for errors)
    from ..train.run import RunAlreadyFinished

    if recipe.stage == "dpo":
        from ..train.preference import run_preference as run
    else:
        from ..train.run import run_training as run

    from ..train.distributed import close_process_group

    try:
        result = run(recipe)
    except RunAlreadyFinished as e:
        print(e, file=sys.stderr)
        close_process_group()
        return 0
    close_process_group()  # every rank is past its last collective: an interrupted run saved collectively too
    if getattr(result, "interrupted_by", None) is not None:
        return 128 + int(result.interrupted_by)  # the shell's convention for "stopped by a signal", after a clean save
    if int(os.environ.get("RANK", "0")) == 0:
        _print_next_steps(recipe, result)
    return 0


def launch_command(nproc: int, recipe: str, overrides: list[str]) -> list[str]:
    """torch's launcher through this interpreter (a venv's qwen-tune called by full path has no torchrun on PATH).

    --standalone rendezvouses on a port the OS picks, so two jobs on one machine never collide on 29500; an
    explicit MASTER_ADDR/MASTER_PORT in the environment wins.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if "MASTER_PORT" in os.environ:
        cmd += ["--master_addr", os.environ.get("MASTER_ADDR", "127.0.0.1"), "--master_port", os.environ["MASTER_PORT"]]
    else:
        cmd.append("--standalone")
    return [*cmd, "-m", "qwen_tune.cli.main", "train", "--recipe", recipe, *overrides]


def _print_next_steps(recipe, result) -> None:  # noqa: ANN001
    s = result.summary
    print("\n── training finished " + "─" * 40)
    print(f"steps {s['steps']}  loss {s['first_logged_loss']} -> {s['last_logged_loss']}  "
          f"{s['tokens_per_s']} tokens/s  peak memory {s.get('peak_memory_gib', s['peak_memory_gb'])} GiB  "
          f"trainable {s['trainable_params']:,} / {s['total_params']:,}")
    out = result.output_dir
    print(f"outputs:      {out}  (recipe: {out}/qwen_tune_recipe.yaml, loss curve: {out}/loss_curve.png, "
          f"TensorBoard: {out}/runs)")
    if recipe.method == "full":
        print(f"chat:         qwen-tune chat --model {out}")
    else:
        print(f"chat:         qwen-tune chat --model {result.base_model} --adapter {out}")
        print(f"merge:        qwen-tune merge-adapter --adapter {out} --out {out}-merged")
