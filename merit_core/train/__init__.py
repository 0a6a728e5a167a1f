"""Training of one MERIT branch (spec step 4): a transformers ``Trainer`` run from θ(0)
(:mod:`.trainer`), on one process or on several under torch's elastic launcher
(:mod:`.launch`), with the setting checks and errors both share (:mod:`.checks`) and the
training progress both report (:mod:`.progress`)."""

from merit_core.refs import TrainStats
from merit_core.train.checks import TrainError, TrainSetupError, check_train_setup
from merit_core.train.launch import (
    RankSetupFailure,
    resolve_nproc,
    run_distributed_branch,
    train_rank,
)
from merit_core.train.progress import ProgressHook, TrainProgress
from merit_core.train.trainer import (
    CHECKPOINT_PREFIX,
    newest_checkpoint,
    planned_steps,
    train_branch,
    trained_token_count,
    world_size,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "ProgressHook",
    "RankSetupFailure",
    "TrainError",
    "TrainProgress",
    "TrainSetupError",
    "TrainStats",
    "check_train_setup",
    "newest_checkpoint",
    "planned_steps",
    "resolve_nproc",
    "run_distributed_branch",
    "train_branch",
    "train_rank",
    "trained_token_count",
    "world_size",
]
