"""Stage *plan split* of an incremental run: new sources placed into a finished run's
groups, only the changed groups retrained (docs/incremental.md).

Every MERIT branch starts from θ(0) and trains on its own group only (spec step 4), so a
source added to the mixture changes only the group it joins. When the store holds a
finished run with the same settings (:func:`settings_fingerprint`), a run with
``run.rerun`` = ``auto`` or ``incremental``:

1. keeps every unchanged source (same name, same content hash) in its old group;
2. places each new or changed source with the split's own rule: its row of C against
   the sources the old PCA axes were fitted on, projected onto those axes and compared
   with the stored weighted-median thresholds (:mod:`merit_core.split.placement`);
3. retrains (from θ(0), on the group's full data) every group whose set of (source,
   content hash) changed — a removed or changed source invalidates its group — and
   reuses the other groups' branches from the store, verified against their manifests.

``auto`` splits again instead (a full run) when the conflict structure moved: the
largest principal angle between the finished run's top-r scores of its unchanged
sources and their top-r scores in the new C exceeds ``run.resplit_angle_deg``
(default 30°). A full split is also chosen when no finished run matches, the strategy is
not ``pca``, r = 0, a group would be left empty, or an old sketch is gone.

After the branches are committed, :func:`save_split_state` stores what the next
incremental run needs (``runs/<run-id>/merit/split-state``, complete with its manifest)
and adds it to the store's split-state index (``index/split-states.json``), so finding
the previous run reads two small objects whatever the size of the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from merit_core.config import MeritConfig
from merit_core.conflict.matrix import conflict_matrix
from merit_core.fanout import FANOUT_FIELDS
from merit_core.pipeline.branches import read_branch
from merit_core.pipeline.conflict import load_sketch
from merit_core.pipeline.layout import SPLIT_STATE_INDEX_KEY, split_state_key
from merit_core.pipeline.partition import partition_sources
from merit_core.refs import BranchRef, ConflictMatrix, MixtureRef, ModelRef, Partition, SketchRef
from merit_core.split.placement import SplitAxes, fit_axes, max_principal_angle_deg
from merit_core.store import ArtifactStore, ObjectNotFoundError, StoreError

logger = logging.getLogger("merit")

STATE_FILE = "split-state.json"


class SplitState(BaseModel):
    """What a finished run leaves for the next incremental run (a few KB of JSON)."""

    run_id: str = Field(description="The run that wrote this state.")
    created_at: float = Field(description="Unix time the state was committed (newest wins).")
    fingerprint: str = Field(description="settings_fingerprint of the run: only equal ones are reused.")
    r: int = Field(description="PCs / halving levels; K = 2^r.")
    sources: dict[str, str] = Field(description="Source name -> content hash, every source of the run.")
    axes_sources: list[str] = Field(description="The sources the PCA axes were fitted on (feature order).")
    axes_sketch_keys: list[str] = Field(description="Store keys of their sketches (rows of C of a new source).")
    axes: dict = Field(description="SplitAxes.to_json(): column means, loadings, cut thresholds.")
    scores: dict[str, list[float]] = Field(description="Source name -> its r PCA scores (projected when placed).")
    groups: list[list[str]] = Field(description="K groups of source names, group k = branch k.")
    branches: list[BranchRef] = Field(description="The committed branch of each group (possibly an older run's).")


class RerunPlan(BaseModel):
    """The split of this run and which branches it trains or reuses."""

    requested: str = Field(description="run.rerun: auto, incremental or full.")
    mode: Literal["full", "incremental"] = Field(description="What this run does.")
    reason: str = Field(description="Why, in one sentence.")
    previous_run: str | None = Field(None, description="The finished run reused from (incremental).")
    partition: Partition
    reuse: dict[int, BranchRef] = Field(default_factory=dict, description="Group index -> branch reused as is.")
    retrain: list[int] = Field(default_factory=list, description="Group indices trained in this run.")
    added: list[str] = Field(default_factory=list, description="Sources not in the previous run.")
    removed: list[str] = Field(default_factory=list, description="Sources of the previous run not in this one.")
    changed: list[str] = Field(default_factory=list, description="Sources whose content hash changed.")
    placed: dict[str, int] = Field(default_factory=dict, description="New/changed source -> group it joined.")
    angle_deg: float | None = Field(None, description="Largest principal angle old vs new top-r scores.")
    threshold_deg: float | None = Field(None, description="run.resplit_angle_deg in force.")
    axes_sources: list[str] = Field(default_factory=list)
    axes_sketch_keys: list[str] = Field(default_factory=list)
    axes: dict | None = None
    forecast: dict | None = Field(None, description="merit_core.split.forecast.forecast_partitions of C.")


def settings_fingerprint(cfg: MeritConfig, base: ModelRef) -> str:
    """sha256 (16 hex) of every setting a trained branch depends on besides its sources:
    θ(0) (its store key), the train section (but threads, checkpoint and logging
    cadence), the data section (but the source list), the sketch settings of the conflict
    section (not where gradients run), the split's r, strategy and balance, and the
    model's dtype and trainable parameters."""
    parts = {
        "base": base.key,
        "train": cfg.train.model_dump(mode="json", exclude={"threads", "save_steps", "logging_steps",
                                                             "nproc_per_node"}),
        "data": cfg.data.model_dump(mode="json", exclude={"sources"}),
        "conflict": cfg.conflict.model_dump(mode="json", exclude=set(FANOUT_FIELDS)),
        "split": cfg.split.model_dump(mode="json", include={"r", "strategy", "balance"}),
        "model": cfg.model.model_dump(mode="json", include={"dtype", "trainable"}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def find_previous_state(store: ArtifactStore, fingerprint: str, exclude_run: str) -> SplitState | None:
    """The newest complete split state in the store with ``fingerprint`` (runs other than
    ``exclude_run``), or None.

    Reads the split-state index (:data:`merit_core.pipeline.layout.SPLIT_STATE_INDEX_KEY`,
    one small object) and then only the candidate states, newest first; a store written
    before the index existed is listed once and the index built from what is found. An
    entry whose state is gone (``merit gc``) or unreadable is skipped with a warning."""
    index = _read_state_index(store)
    for entry in sorted(index.get(fingerprint, []), key=lambda e: -e["created_at"]):
        if entry["run_id"] == exclude_run:
            continue
        key = entry["key"]
        try:
            if not store.is_complete(key):
                raise ObjectNotFoundError(f"{store.uri_for(key)} is not complete")
            state = SplitState.model_validate(store.get_json(f"{key}/{STATE_FILE}"))
        except ObjectNotFoundError:
            logger.info("split state of run %s is gone (collected?); skipped", entry["run_id"])
            continue
        except (StoreError, ValueError) as e:
            logger.warning("split state %s unreadable (%s); ignored", store.uri_for(key), e)
            continue
        if state.fingerprint == fingerprint:
            return state
    return None


def _read_state_index(store: ArtifactStore) -> dict[str, list[dict]]:
    """fingerprint -> [{run_id, key, created_at}] from the store's split-state index; built
    once from a listing of ``runs/`` when the store has none (a store from before it)."""
    try:
        raw = store.get_json(SPLIT_STATE_INDEX_KEY)
        return {fp: list(entries) for fp, entries in raw.get("states", {}).items()}
    except ObjectNotFoundError:
        pass
    except (StoreError, ValueError, AttributeError) as e:
        logger.warning("split-state index %s unreadable (%s); rebuilt from a listing of runs/",
                       store.uri_for(SPLIT_STATE_INDEX_KEY), e)
    index: dict[str, list[dict]] = {}
    for key in store.list_complete("runs"):
        if not key.endswith("/merit/split-state"):
            continue
        try:
            state = SplitState.model_validate(store.get_json(f"{key}/{STATE_FILE}"))
        except (StoreError, ValueError) as e:
            logger.warning("split state %s unreadable (%s); ignored", store.uri_for(key), e)
            continue
        index.setdefault(state.fingerprint, []).append(
            {"run_id": state.run_id, "key": key, "created_at": state.created_at})
    store.put_json(SPLIT_STATE_INDEX_KEY, {"version": 1, "states": index})
    return index


def _index_state(store: ArtifactStore, state: SplitState, key: str) -> None:
    """Add a committed split state to the index (read-modify-write: two runs committing at
    the same instant may drop one entry, which only makes a later run split afresh)."""
    index = _read_state_index(store)
    entries = [e for e in index.get(state.fingerprint, []) if e["run_id"] != state.run_id]
    index[state.fingerprint] = [*entries, {"run_id": state.run_id, "key": key, "created_at": state.created_at}]
    store.put_json(SPLIT_STATE_INDEX_KEY, {"version": 1, "states": index})


def _full(cfg: MeritConfig, fresh: Partition, conflict: ConflictMatrix, sketches: Sequence[SketchRef],
          reason: str, **info) -> RerunPlan:
    keys = {s.source: s.key for s in sketches}
    axes = None
    if fresh.scores is not None and cfg.split.strategy == "pca" and cfg.split.r > 0:
        index = {n: i for i, n in enumerate(conflict.names)}
        fitted, _ = fit_axes(np.asarray(conflict.matrix), [[index[n] for n in g] for g in fresh.groups], cfg.split.r)
        axes = fitted.to_json()
    return RerunPlan(requested=cfg.run.rerun, mode="full", reason=reason, partition=fresh,
                     retrain=list(range(fresh.k)), axes_sources=list(conflict.names),
                     axes_sketch_keys=[keys[n] for n in conflict.names], axes=axes, **info)


def plan_rerun(cfg: MeritConfig, store: ArtifactStore, base: ModelRef, mixture: MixtureRef,
               conflict: ConflictMatrix, sketches: Sequence[SketchRef], run_id: str) -> RerunPlan:
    """Decide between a full split and an incremental run (module docstring) and return
    the partition with the branches to train and to reuse.

    Raises:
        merit_core.store.StoreError: a branch to reuse fails its manifest check (names the branch and
            the file), or its manifest lists other sources than its group."""
    fresh = partition_sources(cfg, conflict, mixture)
    if cfg.run.rerun == "full":
        return _full(cfg, fresh, conflict, sketches, "run.rerun = full: every branch trains")
    if cfg.split.strategy != "pca" or cfg.split.r == 0:
        return _full(cfg, fresh, conflict, sketches, f"split.strategy = {cfg.split.strategy}, r = {cfg.split.r}: "
                     "incremental runs need a PCA split with r ≥ 1")
    prev = find_previous_state(store, settings_fingerprint(cfg, base), run_id)
    if prev is None:
        return _full(cfg, fresh, conflict, sketches, "no finished run with the same settings in the store")
    current = {s.name: s.content_hash for s in mixture.sources}
    kept = [n for n in prev.sources if current.get(n) == prev.sources[n]]
    removed = [n for n in prev.sources if n not in current]
    changed = [n for n in prev.sources if n in current and current[n] != prev.sources[n]]
    added = [n for n in conflict.names if n not in prev.sources]
    info = {"previous_run": prev.run_id, "added": added, "removed": removed, "changed": changed,
            "threshold_deg": cfg.run.resplit_angle_deg}
    if len(kept) <= prev.r:
        return _full(cfg, fresh, conflict, sketches, f"only {len(kept)} source(s) of {prev.run_id} unchanged "
                     f"(need more than r = {prev.r} to compare the structure)", **info)
    names = list(conflict.names)
    new_scores = np.asarray(fresh.scores)[[names.index(n) for n in kept]]
    angle = max_principal_angle_deg(np.asarray([prev.scores[n] for n in kept]), new_scores)
    info["angle_deg"] = angle
    if cfg.run.rerun == "auto" and angle > cfg.run.resplit_angle_deg:
        return _full(cfg, fresh, conflict, sketches, f"the conflict structure moved: principal angle {angle:.1f}° "
                     f"between {prev.run_id}'s top-{prev.r} axes and the new ones > run.resplit_angle_deg = "
                     f"{cfg.run.resplit_angle_deg:g}°", **info)

    try:  # place every new or changed source with the split's rule, on the stored axes
        placed, placed_scores = place_sources(store, prev, added + changed, sketches, cfg.conflict.kind)
    except StoreError as e:
        return _full(cfg, fresh, conflict, sketches, f"a sketch of {prev.run_id}'s axes is gone ({e})", **info)
    scores = {**{n: prev.scores[n] for n in kept}, **placed_scores}
    groups = [[n for n in g if n in kept] for g in prev.groups]
    for n, g in placed.items():
        groups[g].append(n)
    groups = [sorted(g, key=names.index) for g in groups]
    if any(not g for g in groups):
        empty = [k for k, g in enumerate(groups) if not g]
        return _full(cfg, fresh, conflict, sketches, f"group(s) {empty} of {prev.run_id} would be left without "
                     "sources", **info)
    retrain = [k for k, g in enumerate(groups) if sorted(g) != sorted(prev.groups[k]) or set(g) - set(kept)]
    reuse = {k: verified_branch(store, prev.branches[k], g) for k, g in enumerate(groups) if k not in retrain}
    partition = Partition(method="pca", groups=groups, weights=fresh.weights,
                          scores=[scores[n] for n in fresh.weights])  # on the finished run's axes
    why = "run.rerun = incremental" if cfg.run.rerun == "incremental" else f"principal angle {angle:.1f}° ≤ " \
        f"run.resplit_angle_deg = {cfg.run.resplit_angle_deg:g}°"
    reason = f"{len(added)} added, {len(changed)} changed, {len(removed)} removed source(s) against " \
        f"{prev.run_id}; {why}: {len(retrain)} of {len(groups)} branches retrain"
    return RerunPlan(requested=cfg.run.rerun, mode="incremental", reason=reason, partition=partition,
                     reuse=reuse, retrain=retrain, placed=placed, axes_sources=prev.axes_sources,
                     axes_sketch_keys=prev.axes_sketch_keys, axes=prev.axes, **info)


def place_sources(store: ArtifactStore, prev: SplitState, names: Sequence[str], sketches: Sequence[SketchRef],
                  kind: str) -> tuple[dict[str, int], dict[str, list[float]]]:
    """Group and PCA scores of each source in ``names`` on ``prev``'s axes: its row of C
    (``kind``) against the sketches the axes were fitted on, projected and sent down the
    cut tree (:class:`merit_core.split.placement.SplitAxes`).

    Raises:
        merit_core.store.StoreError: a sketch is missing from the store.
    """
    if not names:
        return {}, {}
    axes = SplitAxes.from_json(prev.axes)
    old = np.stack([load_sketch(store, k) for k in prev.axes_sketch_keys])
    keys = {s.source: s.key for s in sketches}
    new = np.stack([load_sketch(store, keys[n]) for n in names])
    c = conflict_matrix(np.concatenate([old, new]), kind=kind)
    z = axes.project(c[len(old):, :len(old)])
    return dict(zip(names, axes.place(z))), {n: [float(v) for v in zn] for n, zn in zip(names, z)}


def verified_branch(store: ArtifactStore, ref: BranchRef, group: Sequence[str]) -> BranchRef:
    """``ref``'s branch read back from its manifest after every file was checked against it
    (``fetch_dir`` verifies sizes and sha256).

    Raises:
        merit_core.store.StoreError: missing, incomplete or corrupted branch directory, or
            one whose manifest lists other sources than ``group``.
    """
    store.fetch_dir(ref.key)
    stored = read_branch(store, ref.key)
    if sorted(stored.sources) != sorted(group):
        raise StoreError(f"branch {store.uri_for(ref.key)} holds sources {stored.sources}, expected {sorted(group)}")
    return stored


def save_split_state(cfg: MeritConfig, store: ArtifactStore, base: ModelRef, mixture: MixtureRef,
                     plan: RerunPlan, branches: Sequence[BranchRef], run_id: str) -> str | None:
    """Commit what the next incremental run needs to ``runs/<run-id>/merit/split-state``
    (after every branch of ``plan`` is committed); return its URI, or None for a plan
    without PCA axes (random / k-means / r = 0)."""
    if plan.axes is None or plan.partition.scores is None:
        return None
    names = list(plan.partition.weights)
    state = SplitState(
        run_id=run_id, created_at=time.time(), fingerprint=settings_fingerprint(cfg, base), r=cfg.split.r,
        sources={s.name: s.content_hash for s in mixture.sources if s.name in plan.partition.weights},
        axes_sources=plan.axes_sources, axes_sketch_keys=plan.axes_sketch_keys, axes=plan.axes,
        scores={n: list(s) for n, s in zip(names, plan.partition.scores)}, groups=plan.partition.groups,
        branches=[b.model_copy(update={"timing": None}) for b in sorted(branches, key=lambda b: b.index)])
    key = split_state_key(run_id)
    staging = store.staging_dir(key)
    (staging / STATE_FILE).write_text(state.model_dump_json(indent=2))
    uri = store.commit_dir(key, staging, metadata={"kind": "split-state"})
    _index_state(store, state, key)
    return uri


def trained_in(ref: BranchRef) -> str:
    """The run id a branch was trained in (``runs/<run-id>/...`` of its key)."""
    parts = ref.key.split("/")
    return parts[1] if len(parts) > 1 and parts[0] == "runs" else ref.key


def rerun_summary(plan: RerunPlan, branches: Sequence[BranchRef]) -> dict:
    """Per branch: retrained or reused (from which run), and the compute saved against a
    full rerun (a full rerun trains every branch of this partition: saved = the reused
    branches' trained tokens N_k and their training seconds when they trained).

    Returns:
        JSON-able dict: ``mode``, ``requested``, ``reason``, ``previous_run``, ``added``,
        ``removed``, ``changed``, ``placed``, ``angle_deg``, ``threshold_deg``,
        ``branches`` (rows), ``tokens_total``, ``tokens_saved``, ``train_s_spent``,
        ``train_s_saved``, ``saved_fraction`` (of tokens).
    """
    rows = []
    for b in sorted(branches, key=lambda b: b.index):
        reused = b.index in plan.reuse
        rows.append({"index": b.index, "action": "reused" if reused else "retrained", "from_run": trained_in(b),
                     "sources": b.sources, "trained_tokens": b.trained_tokens, "train_s": b.wall_s})
    total = sum(r["trained_tokens"] for r in rows)
    saved = sum(r["trained_tokens"] for r in rows if r["action"] == "reused")
    return {**plan.model_dump(include={"mode", "requested", "reason", "previous_run", "added", "removed", "changed",
                                       "placed", "angle_deg", "threshold_deg"}),
            "branches": rows, "tokens_total": total, "tokens_saved": saved,
            "train_s_spent": sum(r["train_s"] for r in rows if r["action"] == "retrained"),
            "train_s_saved": sum(r["train_s"] for r in rows if r["action"] == "reused"),
            "saved_fraction": saved / total if total else 0.0}


def rerun_markdown(s: dict) -> str:
    """The report section of :func:`rerun_summary`."""
    lines = [f"Mode: **{s['mode']}** (run.rerun = {s['requested']}). {s['reason']}."]
    if s["previous_run"]:
        lines.append(f"Previous run: `{s['previous_run']}`; added {s['added'] or '–'}, changed "
                     f"{s['changed'] or '–'}, removed {s['removed'] or '–'}"
                     + (f"; principal angle {s['angle_deg']:.1f}° (threshold {s['threshold_deg']:g}°)"
                        if s["angle_deg"] is not None else "") + ".")
    if s["placed"]:
        lines.append("Placed: " + ", ".join(f"{n} → group {g}" for n, g in s["placed"].items()) + ".")
    lines += ["", "| branch | sources | action | trained in run | N_k | training s |", "|---:|---|---|---|---:|---:|"]
    for r in s["branches"]:
        lines.append(f"| {r['index']} | {', '.join(r['sources'])} | {r['action']} | `{r['from_run']}` | "
                     f"{r['trained_tokens']} | {r['train_s']:.1f} |")
    lines += ["", (f"Compute saved against a full rerun: {s['tokens_saved']} of {s['tokens_total']} branch "
                   f"training tokens ({s['saved_fraction']:.0%}), {s['train_s_saved']:.1f} s of branch training "
                   f"(this run trained {s['train_s_spent']:.1f} s).")]
    return "\n".join(lines)
