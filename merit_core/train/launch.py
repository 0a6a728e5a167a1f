"""One branch on several processes (GPUs): launch :func:`merit_core.train.train_branch`
under ``torchrun`` (``torch.distributed.run``) and collect its result.

The MERIT branches never talk to each other; inside one branch, data parallelism (DDP,
or DeepSpeed ZeRO when ``train.deepspeed`` is set) spreads the branch over the GPUs of
its worker. :func:`run_distributed_branch` writes a small job spec, starts
``python -m torch.distributed.run --standalone --nproc_per_node N -m merit_core.launch
SPEC`` and waits; every rank runs :func:`main`, rank 0 uploads checkpoints to the store
as the Trainer writes them and writes ``result.json``. The parent reads that file, not
the processes' output.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from merit_core.train import BranchResult, TrainError, TrainSetupError

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def resolve_nproc(value: int | str) -> int:
    """Processes for one branch: an int as given; ``"auto"`` = visible CUDA devices
    (``torch.cuda.device_count()``), 1 on a machine without CUDA."""
    if value == "auto":
        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    return int(value)


def run_distributed_branch(spec: dict[str, Any], work_dir: str | os.PathLike, nproc: int,
                           env: dict[str, str] | None = None, tail_lines: int = 60) -> BranchResult:
    """Train one branch on ``nproc`` processes with torchrun and return rank 0's result.

    Args:
        spec: JSON-able job: ``config`` (MeritConfig dump), ``base_dir``, ``examples``
            (JSON Lines of TokenizedExample, :func:`merit_core.artifacts.write_examples`),
            ``output_dir``, ``checkpoint_dir``, ``checkpoint_prefix`` (store key under
            which rank 0 commits each checkpoint, or None), ``dtype``.
        work_dir: holds ``spec.json`` and rank 0's ``result.json``.
        nproc: processes on this node (``--nproc_per_node``), ≥ 2.
        env: extra environment for the processes (e.g. ``OMP_NUM_THREADS``).
        tail_lines: lines of the processes' output kept for the error message.

    Returns:
        The :class:`BranchResult` rank 0 wrote.

    Raises:
        TrainError: torchrun exited non-zero (message: exit code and the last lines
            of output) or rank 0 wrote no result.
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    result_path = work / RESULT_FILE
    result_path.unlink(missing_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
           "-m", "merit_core.launch", str(spec_path)]
    logger.info("launching branch on %d processes: %s", nproc, " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail.append(line)
        logger.info("[torchrun] %s", line)
    rc = proc.wait()
    if rc != 0:
        error = TrainSetupError if any("TrainSetupError" in line for line in tail) else TrainError
        raise error(f"distributed branch ({nproc} processes) failed with exit code {rc}; last output:\n"
                         + "\n".join(tail))
    if not result_path.is_file():
        raise TrainError(f"distributed branch finished but rank 0 wrote no {result_path}")
    return BranchResult(**json.loads(result_path.read_text()))


def main(argv: list[str] | None = None) -> int:
    """Entry point of each rank: ``python -m merit_core.launch SPEC`` (under torchrun)."""
    from merit_core.artifacts import read_examples
    from merit_core.config import MeritConfig
    from merit_core.stages import store_for
    from merit_core.train import train_branch

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m merit_core.launch SPEC.json (run by torchrun)", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    cfg = MeritConfig.model_validate(spec["config"])
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    upload = None
    prefix = spec.get("checkpoint_prefix")
    if rank == 0 and prefix:
        store = store_for(cfg)

        def upload(path: Path) -> None:
            store.commit_dir(f"{prefix}/{path.name}", path, metadata={"kind": "train-checkpoint"})

    res = train_branch(spec["base_dir"], read_examples(spec["examples"]), spec["output_dir"], cfg.train,
                       checkpoint_dir=spec["checkpoint_dir"], dtype=spec.get("dtype", "float32"),
                       on_checkpoint=upload)
    if rank == 0:
        tmp = Path(spec["result"] + ".partial")
        tmp.write_text(json.dumps(res.to_dict()))
        os.replace(tmp, spec["result"])
    # Leave together: a rank that exits while others still use the process group
    # aborts in the group's destructor ("terminate called without an active exception").
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
