"""One branch on several processes (GPUs): :func:`merit_core.train.train_branch` on every
rank of a torch elastic launch (what ``torchrun --standalone`` runs), rank 0's result
returned to the caller.

The MERIT branches never talk to each other; inside one branch, data parallelism (DDP,
or DeepSpeed ZeRO when ``train.deepspeed`` is set) spreads the branch over the GPUs of
its worker. :func:`run_distributed_branch` starts the ranks with
``torch.distributed.launcher.api.elastic_launch``, which hands each rank's return value
back to the parent: every rank runs :func:`train_rank`, rank 0 hands each checkpoint the
Trainer writes to the caller's ``on_checkpoint`` (the pipeline commits it to the store)
and each Trainer log to a file that the parent follows (:mod:`merit_core.train.progress`):
the parent logs the training progress and calls ``on_progress`` in its own process and
context. The ranks write to the parent's stdout/stderr.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import BaseModel
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from merit_core.config import TrainConfig
from merit_core.refs import TrainStats, read_examples
from merit_core.train.checks import TrainError, TrainSetupError
from merit_core.train.progress import AppendProgress, ProgressFollower, ProgressHook
from merit_core.train.trainer import train_branch

logger = logging.getLogger(__name__)


class RankSetupFailure(BaseModel):
    """A rank refused the branch's settings (a :class:`TrainSetupError`) before training:
    what :func:`train_rank` returns instead of raising, so that the parent raises the
    same error type without parsing any output."""

    rank: int
    message: str


def resolve_nproc(value: int | str) -> int:
    """Processes for one branch: an int as given; ``"auto"`` = visible CUDA devices
    (``torch.cuda.device_count()``), 1 on a machine without CUDA."""
    if value == "auto":
        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    return int(value)


def run_distributed_branch(base_dir: str | os.PathLike, examples: str | os.PathLike, output_dir: str | os.PathLike,
                           cfg: TrainConfig, *, nproc: int, checkpoint_dir: str | os.PathLike, dtype: str = "float32",
                           on_checkpoint: Callable[[Path], None] | None = None,
                           on_progress: ProgressHook | None = None, trust_remote_code: bool = False,
                           trainable: str | list[str] = "all") -> TrainStats:
    """Train one branch on ``nproc`` local processes and return rank 0's stats.

    Args:
        base_dir: HF directory of θ(0).
        examples: JSON Lines of the branch's TokenizedExamples
            (:func:`merit_core.refs.write_examples`); every rank reads it.
        output_dir: where rank 0 writes θ_k (HF directory).
        cfg: the branch hyper-parameters.
        nproc: processes on this node (``nproc_per_node``), ≥ 1 (1 for DeepSpeed on one GPU).
        checkpoint_dir: local ``checkpoint-<step>`` dirs (resumed from when present).
        dtype: weights dtype for training.
        on_checkpoint: called by rank 0 with each local ``checkpoint-<step>`` directory
            once the Trainer has written it (e.g. to commit it to the store); it is
            pickled to the ranks, so it must be a picklable callable (a module-level
            function or an instance of a module-level class).
        on_progress: called in this process (in a thread running in a copy of the
            caller's context) with each Trainer log of rank 0; it is not pickled.
        trust_remote_code: run model code shipped with θ(0) (``model.trust_remote_code``).
        trainable: ``model.trainable``; the other parameters stay frozen at θ(0).

    Without ``OMP_NUM_THREADS`` in the environment each rank of a multi-process branch
    uses one intra-op thread (torchrun's default) unless ``cfg.threads`` says otherwise.
    The ranks are started with multiprocessing's ``spawn``: they re-import the caller's
    main module, which must therefore be a file or module guarded by
    ``if __name__ == "__main__"`` (the ``merit`` command, Prefect's engine and pytest are).

    Returns:
        The :class:`TrainStats` of rank 0.

    Raises:
        TrainSetupError: a rank refused the settings (e.g. DeepSpeed without CUDA, no
            examples).
        TrainError: a rank failed (message: the failing rank, its exit code and the
            root-cause exception with its traceback).
        ValueError: ``nproc`` < 1.
    """
    if nproc < 1:
        raise ValueError(f"run_distributed_branch: nproc must be ≥ 1, got {nproc}")
    logger.info("launching branch on %d processes (torch elastic launch, output %s)", nproc, output_dir)
    with tempfile.TemporaryDirectory(prefix="merit-launch-") as logs:  # the ranks' error files
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              logs_specs=DefaultLogsSpecs(log_dir=logs))
        progress = Path(logs) / "progress.jsonl"
        try:
            with ProgressFollower(progress, on_progress):
                results = elastic_launch(config, train_rank)(cfg, str(base_dir), str(examples), str(output_dir),
                                                             str(checkpoint_dir), dtype, on_checkpoint, str(progress),
                                                             trust_remote_code, trainable)
        except ChildFailedError as err:
            raise TrainError(f"distributed branch ({nproc} processes) failed:\n{err}") from err
    refused = [r for r in results.values() if isinstance(r, RankSetupFailure)]
    if refused:
        raise TrainSetupError(refused[0].message)
    return results[0]


def train_rank(cfg: TrainConfig, base_dir: str, examples: str, output_dir: str, checkpoint_dir: str, dtype: str,
               on_checkpoint: Callable[[Path], None] | None,
               progress_path: str | None = None, trust_remote_code: bool = False,
               trainable: str | list[str] = "all") -> TrainStats | RankSetupFailure:
    """What every rank of :func:`run_distributed_branch` runs (``RANK``, ``WORLD_SIZE``
    and the rendezvous are set by the elastic agent); arguments as there. Rank 0 appends
    each Trainer log to ``progress_path`` (JSON Lines) and leaves logging it to the parent.

    Returns:
        This rank's :class:`TrainStats`, or a :class:`RankSetupFailure` naming the
        refused setting. Other errors propagate (the launcher records them).
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    if progress_path:  # the parent logs each record (ProgressFollower); not twice on the console
        logging.getLogger("merit_core.train.progress").setLevel(logging.WARNING)
    if world > 1 and "OMP_NUM_THREADS" not in os.environ:  # torchrun's default: no oversubscribed cores
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    try:
        result: TrainStats | RankSetupFailure = train_branch(
            base_dir, read_examples(examples), output_dir, cfg, checkpoint_dir=checkpoint_dir, dtype=dtype,
            on_checkpoint=on_checkpoint if rank == 0 else None,
            on_progress=AppendProgress(progress_path) if rank == 0 and progress_path else None,
            trust_remote_code=trust_remote_code, trainable=trainable)
    except TrainSetupError as err:
        result = RankSetupFailure(rank=rank, message=str(err))
    # Leave together: a rank that exits while others still use the process group
    # aborts in the group's destructor ("terminate called without an active exception").
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result
