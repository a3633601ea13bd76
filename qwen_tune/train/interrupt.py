"""Nothing lost on Ctrl-C: the first SIGINT/SIGTERM saves a complete checkpoint at the end of the current step and
stops; a second one aborts at once. Also a time-based save, so a crash costs at most `save_every_minutes`.

Written by hand because the Trainer has neither: a KeyboardInterrupt in the middle of a step leaves whatever the
last `save_steps` checkpoint was (none, before the first), and its save strategies count steps, not time.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import torch
from transformers import TrainerCallback

log = logging.getLogger("qwen_tune")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop(TrainerCallback):
    """Turns a stop request (signal) or an elapsed save interval into `should_save` at the next step end.

    Under distributed training every rank must take the same decision (a save is collective), so the local flags are
    max-reduced across ranks at each step end: one small reduction per optimizer step.
    """

    def __init__(self, save_every_minutes: float = 0.0) -> None:
        self.save_every_s = save_every_minutes * 60
        self.stop_signal: int | None = None  # the signal that asked to stop, once one did
        self._last_save = time.monotonic()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (a notebook's worker, a test thread)
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_signal is not None:
            self.restore()
            log.warning("second %s: aborting now, without saving", signal.Signals(signum).name)
            raise KeyboardInterrupt
        self.stop_signal = signum
        log.warning("%s: saving a checkpoint at the end of this step, then stopping (press Ctrl-C again to abort "
                    "at once)", signal.Signals(signum).name)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        stop = self.stop_signal is not None
        due = self.save_every_s > 0 and time.monotonic() - self._last_save >= self.save_every_s
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flags = torch.tensor([int(stop), int(due)], device=args.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            stop, due = bool(flags[0]), bool(flags[1])
            if stop and self.stop_signal is None:
                self.stop_signal = signal.SIGTERM  # another rank was asked to stop
        if stop:
            control.should_save = True
            control.should_training_stop = True
        elif due:
            log.info("output.save_every_minutes: saving a checkpoint at step %d", state.global_step)
            control.should_save = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._last_save = time.monotonic()
        return control
