"""Errors of a training branch and the pre-flight check of its settings.

Kept apart from the Trainer run: the flow checks the settings before any stage runs,
and the pipeline tells setup errors (not retried) from others.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merit_core.config import TrainConfig


class TrainError(RuntimeError):
    """A branch cannot train (bad input or an unsupported setting); names the cause."""


class TrainSetupError(TrainError):
    """A setting this machine cannot run (DeepSpeed without CUDA, a missing DeepSpeed
    config, a batch the process count does not divide, no examples): retrying the
    branch cannot help, so the pipeline does not retry it."""


def check_train_setup(cfg: TrainConfig, nproc: int = 1) -> None:
    """Fail fast on settings this machine cannot train with, before any work.

    The flow calls this when it starts (for branches that run on this machine), and
    every branch again before training.

    Args:
        cfg: the branch hyper-parameters (``train`` section of the config).
        nproc: processes that train one branch together (torchrun world size).

    Raises:
        TrainSetupError: DeepSpeed without CUDA, a missing DeepSpeed config file, or
            ``cfg.batch_size`` not divisible by ``nproc`` processes.
    """
    _check_deepspeed(cfg)
    if cfg.batch_size % nproc:
        raise TrainSetupError(f"train.batch_size={cfg.batch_size} is not divisible by the {nproc} processes "
                              f"of a branch (train.nproc_per_node={cfg.nproc_per_node!r})")


def _check_deepspeed(cfg: TrainConfig) -> None:
    if cfg.deepspeed and not torch.cuda.is_available():
        raise TrainSetupError(
            f"train.deepspeed={cfg.deepspeed!r} needs CUDA GPUs, but torch sees none on this machine; "
            "unset train.deepspeed to train on CPU"
        )
    if cfg.deepspeed and not Path(cfg.deepspeed).is_file():
        raise TrainSetupError(f"train.deepspeed: DeepSpeed config file {cfg.deepspeed} does not exist")
