"""Stage *train branch* (MERIT spec step 4, paper §3.3): one copy of θ(0) fine-tuned on
the union of a group's sources, with no communication with other branches; and reading
finished branches back from the store."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from merit_core.config import MeritConfig
from merit_core.data.types import TokenizedExample
from merit_core.pipeline.layout import branch_checkpoints_prefix, branch_key, checkpoint_key, work_dir_name
from merit_core.pipeline.mixture import load_split
from merit_core.refs import BranchRef, BranchTiming, MixtureRef, ModelRef, write_examples
from merit_core.store import ArtifactStore, StoreError, default_cache_dir
from merit_core.store.objects import intact_dir
from merit_core.train import ProgressHook, check_train_setup, resolve_nproc, run_distributed_branch
from merit_core.train import train_branch as run_trainer

logger = logging.getLogger("merit")


class BranchStoreError(StoreError):
    """A branch that should be finished has no complete, matching directory in the store."""


@dataclass(frozen=True)
class CheckpointUpload:
    """Commits a local Trainer checkpoint directory (``checkpoint-<step>``) to the store
    under a branch's checkpoint prefix. Picklable, so it also travels to rank 0 of a
    distributed branch."""

    store: ArtifactStore
    prefix: str

    def __call__(self, path: Path) -> None:
        self.store.commit_dir(checkpoint_key(self.prefix, path.name), path, metadata={"kind": "train-checkpoint"})


def train_branch(cfg: MeritConfig, store: ArtifactStore, base: ModelRef, mixture: MixtureRef,
                 sources: Sequence[str], run_id: str, label: str, index: int,
                 after_checkpoint: Callable[[Path], None] | None = None,
                 on_progress: ProgressHook | None = None) -> BranchRef:
    """Fine-tune θ(0) on the union of ``sources`` and commit θ_k to
    ``runs/<run-id>/<label>/branches/<index>/`` (returned as-is if already complete).

    Checkpoints go to ``.../branches/<index>-checkpoints/checkpoint-<step>/`` as the
    Trainer writes them; a restarted branch (retry, new worker) first fetches the newest
    complete one and resumes from it; they are deleted once θ_k is committed.
    ``after_checkpoint`` is called with each local checkpoint dir once it is in the store
    (in-process training only); ``on_progress`` in this process with each Trainer log
    (:class:`merit_core.train.TrainProgress`), however the branch trains. With
    ``train.nproc_per_node`` > 1, or DeepSpeed, the branch trains on that many processes
    under torch's elastic launcher (:mod:`merit_core.train.launch`).

    Raises:
        merit_core.train.TrainSetupError: settings this machine cannot train with.
        merit_core.train.TrainError: training failed.
    """
    key = branch_key(run_id, label, index)
    if intact_dir(store, key):  # a damaged θ_k is trained again
        logger.info("branch %s/%d already complete in the store; reusing it", label, index)
        return read_branch(store, key)
    examples: list[TokenizedExample] = []
    for name in sorted(sources):
        examples += load_split(store, mixture.get(name), "train")
    base_dir = store.fetch_dir(base.key)

    ckpt_prefix = branch_checkpoints_prefix(run_id, label, index)
    work, ckpt_dir = _work_dir(run_id, label, index)
    _restore_newest_checkpoint(store, ckpt_prefix, ckpt_dir)

    upload = CheckpointUpload(store, ckpt_prefix)

    def upload_then(path: Path) -> None:
        upload(path)
        if after_checkpoint is not None:
            after_checkpoint(path)

    out = store.staging_dir(key)
    nproc = resolve_nproc(cfg.train.nproc_per_node)
    check_train_setup(cfg.train, nproc)
    load = {"dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code, "on_progress": on_progress,
            "trainable": cfg.model.trainable}
    if nproc > 1 or cfg.train.deepspeed:  # elastic launcher (DDP / DeepSpeed ZeRO, which needs its env even on 1 GPU)
        write_examples(work / "examples.jsonl", examples)
        stats = run_distributed_branch(base_dir, work / "examples.jsonl", out, cfg.train, nproc=nproc,
                                       checkpoint_dir=ckpt_dir, on_checkpoint=upload, **load)
    else:
        stats = run_trainer(base_dir, examples, out, cfg.train, checkpoint_dir=ckpt_dir, on_checkpoint=upload_then, **load)
    ref = BranchRef(index=index, label=label, key=key, uri=store.uri_for(key), sources=sorted(sources),
                    **stats.model_dump())
    store.commit_dir(key, out, metadata={"kind": "branch", "branch": ref.model_dump()})
    store.delete_prefix(ckpt_prefix)
    shutil.rmtree(work, ignore_errors=True)
    _log_branch(ref)
    return ref


REUSE_TOLERANCE_S = 5.0
"""A branch whose training began more than this before it was asked for was trained
earlier and reused from the store (allows for clock skew between machines)."""


def branch_timing(ref: BranchRef, asked: float, started: float | None, ended: float) -> BranchTiming:
    """Where the wall time of the flow run that produced ``ref`` went.

    Args:
        ref: the branch, with ``started_at`` and ``wall_s`` of its training run.
        asked, started, ended: Unix times at which the parent asked for the branch (or
            its flow run was created), the flow run entered Running (None: never seen
            Running, taken as ``asked``) and ended.

    Returns:
        :class:`BranchTiming`: wall = ended − asked, queued = started − asked, start-up =
        training start − started, commit = ended − training end (each ≥ 0, clock skew
        clipped), and for a branch trained before ``asked`` (reused from the store) no
        training at all.
    """
    started = asked if started is None else started
    wall, queued = ended - asked, max(0.0, started - asked)
    if ref.started_at is None or ref.started_at < asked - REUSE_TOLERANCE_S:
        return BranchTiming(wall_s=wall, queued_s=queued, startup_s=None, train_s=0.0, commit_s=None, reused=True)
    return BranchTiming(wall_s=wall, queued_s=queued, startup_s=max(0.0, ref.started_at - started),
                        train_s=ref.wall_s, commit_s=max(0.0, ended - (ref.started_at + ref.wall_s)))


def _log_branch(ref: BranchRef) -> None:
    logger.info("branch %s/%d: %d sources, %d examples, %d steps, N_k = %d tokens, train loss %.3f, %.1f s, "
                "%s real tokens%s", ref.label, ref.index, len(ref.sources), ref.examples, ref.steps,
                ref.trained_tokens, ref.train_loss, ref.wall_s, "–" if ref.real_token_fraction is None else
                f"{ref.real_token_fraction:.1%}", " (packed)" if ref.packed else "")


def _work_dir(run_id: str, label: str, index: int) -> tuple[Path, Path]:
    """The branch's local work directory and its ``checkpoints`` dir (created); its
    ``pid`` file names the process training the branch (for an operator, or a test
    that kills it)."""
    work = default_cache_dir() / "work" / work_dir_name(run_id, label, index)
    (work / "checkpoints").mkdir(parents=True, exist_ok=True)
    (work / "pid").write_text(f"{os.getpid()}\n")
    return work, work / "checkpoints"


def _restore_newest_checkpoint(store: ArtifactStore, prefix: str, ckpt_dir: Path) -> None:
    """Copy the newest complete ``checkpoint-<step>`` under ``prefix`` into ``ckpt_dir``."""
    complete = store.list_complete(prefix)
    if not complete:
        return
    newest = max(complete, key=lambda k: int(k.rstrip("/").rsplit("-", 1)[-1]))
    dest = ckpt_dir / newest.rstrip("/").rsplit("/", 1)[-1]
    if not dest.exists():
        src = store.fetch_dir(newest)
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("manifest.json"))
    logger.info("restored training checkpoint %s for resume", newest)


def read_branch(store: ArtifactStore, key: str) -> BranchRef:
    """The BranchRef recorded in the manifest of a complete branch directory."""
    return BranchRef.model_validate(store.get_json(f"{key}/manifest.json")["metadata"]["branch"])


def collect_branches(store: ArtifactStore, run_id: str, label: str, groups: Sequence[Sequence[str]],
                     indices: Sequence[int] | None = None) -> list[BranchRef]:
    """The finished branches of a partition, in group order, read from the store (how a
    parent learns what branches trained elsewhere produced). ``indices``: the branch
    index of each group (default 0 .. len(groups) − 1).

    Raises:
        BranchStoreError: a branch directory is missing or incomplete (the worker wrote to
            a different store), or holds other sources than its group.
    """
    results = []
    for index, group in zip(range(len(groups)) if indices is None else indices, groups):
        key = branch_key(run_id, label, index)
        if not store.is_complete(key):
            raise BranchStoreError(
                f"branch {label}/{index}: {store.uri_for(key)} has no manifest; the branch worker wrote to a "
                "different store than the parent (check store.uri)")
        ckpt = read_branch(store, key)
        if sorted(ckpt.sources) != sorted(group):
            raise BranchStoreError(f"branch {label}/{index}: {store.uri_for(key)} holds sources {ckpt.sources}, "
                                   f"expected {sorted(group)}")
        results.append(ckpt)
    return results
