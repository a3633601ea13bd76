"""Ctrl-C, SIGTERM and a rerun of a finished command: nothing lost, nothing trained twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT, run_cli
from qwen_tune.config import load_recipe
from qwen_tune.train.run import run_training
from qwen_tune.train.trainer import is_complete, latest_complete_checkpoint

SMALL = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 1024, "tie_word_embeddings": False, "qwen_tune_is_chat": True}
STEPS = 8

# The training process of the test: the real CLI run, with one harness callback that slows each step down (so the
# signal lands mid-run) and tells the test which step finished.
CHILD = """
import sys, time
from transformers import TrainerCallback
from qwen_tune.config import load_recipe
from qwen_tune.train.run import run_training

class Pace(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        time.sleep(0.4)

    def on_step_end(self, args, state, control, **kw):
        open(sys.argv[1], "w").write(str(state.global_step))

result = run_training(load_recipe("tiny", sys.argv[2:]), callbacks=[Pace()])
sys.exit(128 + result.interrupted_by if result.interrupted_by else 0)
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("inputs")
    (d / "small.json").write_text(json.dumps(SMALL))
    (d / "d.json").write_text(json.dumps(json.loads((EXAMPLES / "example.json").read_text())[:16], ensure_ascii=False))
    return d / "small.json", d / "d.json"


@pytest.fixture(scope="module")
def reference_losses(inputs, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run's losses: the same for both signals, trained once."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return _losses(run_training(load_recipe("tiny", overrides(inputs, out))).log_history)


def overrides(inputs: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [f"model.from_config={inputs[0]}", f"data.path={inputs[1]}", f"output.dir={out}", "data.max_len=128",
            "training.batch_size=2", f"training.max_steps={STEPS}", "training.warmup_ratio=0", "output.report_to=[]",
            "output.logging_steps=1", "output.save_steps=1000", "lora.r=4", *extra]


def _losses(history) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def _start(tmp_path: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "step"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = open(tmp_path / "child.log", "w")
    proc = subprocess.Popen([sys.executable, str(script), str(marker), *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=tmp_path)
    return proc, marker


def _wait_for_step(proc: subprocess.Popen, marker: Path, tmp_path: Path) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), (tmp_path / "child.log").read_text(errors="replace")[-4000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_saves_a_complete_checkpoint_and_resume_reproduces_losses(inputs, reference_losses, tmp_path,
                                                                              sig):
    out = tmp_path / "run"
    proc, marker = _start(tmp_path, overrides(inputs, out))
    _wait_for_step(proc, marker, tmp_path)
    proc.send_signal(sig)
    rc = proc.wait(timeout=300)
    log = (tmp_path / "child.log").read_text(errors="replace")
    assert rc == 128 + sig, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    ckpt = latest_complete_checkpoint(out)
    assert ckpt is not None and is_complete(ckpt), log[-4000:]  # save_steps=1000: before, nothing was saved
    stopped_at = int(Path(ckpt).name.split("-")[1])
    assert 1 <= stopped_at < STEPS
    assert not (out / "train_summary.json").exists()  # not mistaken for a finished run

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when pytest runs as a background job
    resumed = run_training(load_recipe("tiny", overrides(inputs, out)))
    got, ref = _losses(resumed.log_history), reference_losses
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(stopped_at + 1, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored after train


def test_second_ctrl_c_aborts_at_once(inputs, tmp_path):
    out = tmp_path / "run"
    proc, marker = _start(tmp_path, overrides(inputs, out))
    _wait_for_step(proc, marker, tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # two signals pending at once are delivered as one
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=300)
    log = (tmp_path / "child.log").read_text(errors="replace")
    assert rc != 0 and "KeyboardInterrupt" in log, log[-4000:]
    assert latest_complete_checkpoint(out) is None  # aborted before the save the first Ctrl-C asked for


def test_time_based_save(inputs, tmp_path):
    # In this process (no signal involved): a child would pay torch's and transformers' start-up again.
    from transformers import TrainerCallback

    class Pace(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            time.sleep(0.4)

    out = tmp_path / "run"
    run_training(load_recipe("tiny", overrides(inputs, out, "training.max_steps=3", "output.save_every_minutes=0.005",
                                               "output.save_total_limit=null", "output.save_final=false")),
                 callbacks=[Pace()])
    # 0.3 s per interval, 0.4 s per paced step: every step is due for a save.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_rerunning_a_finished_run_says_so_and_trains_nothing(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    args = overrides(inputs, out, "training.max_steps=3", "output.resume_from_checkpoint=auto")
    assert run_cli("train", "--recipe", "tiny", *args) == 0
    before = sorted(p.name for p in out.glob("checkpoint-*"))
    summary = (out / "train_summary.json").read_text()
    capsys.readouterr()
    assert run_cli("train", "--recipe", "tiny", *args) == 0
    err = capsys.readouterr().err
    assert f"{out} already holds a finished run (3/3 steps)" in err
    assert "output.overwrite=true" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == before == ["checkpoint-3"]
    assert (out / "train_summary.json").read_text() == summary


def test_tokens_per_s_after_resume_counts_only_this_session(inputs, tmp_path):
    out = tmp_path / "run"
    run_training(load_recipe("tiny", overrides(inputs, out, "training.max_steps=4", "output.save_steps=3",
                                                "output.save_final=false")))
    import shutil

    shutil.rmtree(out / "checkpoint-4")  # killed after step 3's checkpoint
    (out / "train_summary.json").unlink()
    resumed = run_training(load_recipe("tiny", overrides(inputs, out, "training.max_steps=4",
                                                         "output.resume_from_checkpoint=auto")))
    s = resumed.summary
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert s["input_tokens_this_session"] == s["input_tokens"] - state["num_input_tokens_seen"] > 0
    # One step trained in this session: the rate's window is this session's tokens only.
    assert s["tokens_per_s_window"]["input_tokens"] == s["input_tokens_this_session"]
