"""What a branch says while it trains: every Trainer log (each ``train.logging_steps``
optimizer steps, and once at the end) becomes one :class:`TrainProgress` — step, loss,
learning rate, gradient norm, steps/s and samples/s — logged as one line on the
``merit_core.train.progress`` logger and handed to an optional hook (the flow layer
plugs a Prefect progress artifact in there; merit_core knows nothing of Prefect).

A branch trained by torch's elastic launcher (:mod:`merit_core.train.launch`) runs
the Trainer in child processes: rank 0 appends each :class:`TrainProgress` to a JSON
Lines file (:class:`AppendProgress`) and the parent follows that file
(:class:`ProgressFollower`), logging and hooking each record *in the parent*, in the
context (contextvars) of the caller, e.g. the Prefect task run that started the branch.
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from pydantic import BaseModel, Field

logger = logging.getLogger(__name__)

ProgressHook = Callable[["TrainProgress"], None]


class TrainProgress(BaseModel):
    """One Trainer log of a branch, as seen on rank 0."""

    step: int = Field(description="Optimizer steps done.")
    max_steps: int = Field(description="Optimizer steps the run will make.")
    epoch: float | None = None
    loss: float | None = Field(None, description="Mean training loss since the previous log (nats/token).")
    learning_rate: float | None = None
    grad_norm: float | None = None
    steps_per_s: float | None = Field(None, description="Optimizer steps per second since the previous log.")
    samples_per_s: float | None = Field(None, description="steps_per_s × the global batch (examples).")
    elapsed_s: float = Field(description="Seconds since this training run began.")
    final: bool = Field(False, description="The Trainer's closing log (train_loss over the whole run).")

    @property
    def fraction(self) -> float:
        """step / max_steps, in [0, 1]."""
        return min(1.0, self.step / self.max_steps) if self.max_steps > 0 else 0.0

    def line(self) -> str:
        """The log line, e.g. ``step 3/10 (30%): loss 2.4512, lr 1.00e-03, grad norm 1.234,
        0.85 steps/s (6.8 samples/s), 3.5 s``."""
        parts = [f"loss {self.loss:.4f}" if self.loss is not None else None,
                 f"lr {self.learning_rate:.2e}" if self.learning_rate is not None else None,
                 f"grad norm {self.grad_norm:.3f}" if self.grad_norm is not None else None]
        if self.steps_per_s is not None:
            parts.append(f"{self.steps_per_s:.3g} steps/s ({self.samples_per_s:.3g} samples/s)")
        parts.append(f"{self.elapsed_s:.1f} s")
        head = "training done" if self.final else "step"
        return f"{head} {self.step}/{self.max_steps} ({self.fraction:.0%}): " + ", ".join(p for p in parts if p)


def _number(logs: dict, key: str) -> float | None:
    v = logs.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _call(hook: ProgressHook | None, progress: TrainProgress) -> None:
    """``hook(progress)``; a failing hook (e.g. an API that is down) is logged, and
    training goes on."""
    if hook is None:
        return
    try:
        hook(progress)
    except Exception:  # progress reporting never stops training
        logger.warning("training progress hook failed (training goes on)", exc_info=True)


def progress_callback(hook: ProgressHook | None = None):
    """A ``transformers.TrainerCallback`` that turns each Trainer log on rank 0 into a
    :class:`TrainProgress`, logs its line (INFO, ``merit_core.train.progress``) and
    calls ``hook`` with it. The rate is measured between consecutive logs (over the whole
    run on the closing log); the learning rate is the one the logged step used."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # HF's callback signature
            self.t0 = time.perf_counter()
            self.first = self.last = (self.t0, state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):  # HF's callback signature
            if not state.is_world_process_zero or not logs:
                return
            now = time.perf_counter()
            final = "train_loss" in logs
            since = self.first if final else self.last  # the closing log: the whole run's rate
            rate = None
            if now > since[0] and state.global_step > since[1]:
                rate = (state.global_step - since[1]) / (now - since[0])
            self.last = (now, state.global_step)
            batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            p = TrainProgress(step=state.global_step, max_steps=state.max_steps, epoch=_number(logs, "epoch"),
                              loss=_number(logs, "train_loss" if final else "loss"),
                              learning_rate=_number(logs, "learning_rate"), grad_norm=_number(logs, "grad_norm"),
                              steps_per_s=rate, samples_per_s=None if rate is None else rate * batch,
                              elapsed_s=now - self.t0, final=final)
            logger.info(p.line())
            _call(hook, p)

    return _Progress()


class AppendProgress:
    """A picklable hook that appends each :class:`TrainProgress` to a JSON Lines file
    (what rank 0 of a launched branch hands to its parent)."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def __call__(self, progress: TrainProgress) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(progress.model_dump_json() + "\n")


class ProgressFollower:
    """Follows a JSON Lines file of :class:`TrainProgress` (written by
    :class:`AppendProgress` in another process): each new record is logged on
    ``merit_core.train.progress`` and handed to ``hook``, in a thread that runs in a
    copy of the creator's context. Use as a context manager; leaving it reads what is
    left in the file and stops the thread.
    """

    def __init__(self, path: str | Path, hook: ProgressHook | None = None, poll_s: float = 0.5):
        self.path, self.hook, self.poll_s = Path(path), hook, poll_s
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._loop,),
                                        name="merit-train-progress", daemon=True)

    def __enter__(self) -> Self:
        self.path.touch()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._read()
        self._read()

    def _read(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                p = TrainProgress.model_validate_json(line)
            except ValueError:
                logger.warning("unreadable training progress record in %s: %r", self.path, line[:200])
                continue
            logger.info(p.line())
            _call(self.hook, p)
