"""The joint and random-split baselines of an incremental run (docs/incremental.md,
"Baselines in incremental runs").

When the MERIT plan is incremental (:class:`~merit_core.pipeline.incremental.RerunPlan`
``mode == "incremental"``), the baselines are rerun against the same finished run
(``plan.previous_run``), from the state it committed after its baseline branches
(``runs/<run-id>/baselines-state``):

- **joint** (one branch on every source) is reused as is when that run trained it on
  exactly the same set of (source, content hash); otherwise it retrains;
- **random** keeps the finished run's random groups for unchanged sources; removed and
  changed sources leave their group, and every new or changed source joins one with
  :func:`merit_core.split.baselines.random_placement` (the lightest group, seeded from
  ``split.seed`` and the source name). Only groups whose (source, content hash) set
  changed retrain; the others are reused. The random split is drawn again in full when
  the finished run has no random baseline, was drawn with another ``split.seed`` or K, or
  a group would be left empty.

Reused branches are verified against their manifests and keep their original run's key
(no weights are copied). In a full MERIT run every baseline branch trains.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, Field

from merit_core.config import MeritConfig
from merit_core.pipeline.incremental import RerunPlan, settings_fingerprint, trained_in, verified_branch
from merit_core.pipeline.layout import baselines_state_key
from merit_core.pipeline.partition import partition_sources
from merit_core.refs import BranchRef, ConflictMatrix, MixtureRef, ModelRef
from merit_core.split.baselines import random_placement
from merit_core.store import ArtifactStore, StoreError

logger = logging.getLogger("merit")

STATE_FILE = "baselines-state.json"
Label = Literal["joint", "random"]


class BaselineState(BaseModel):
    """One baseline of a finished run, as the next incremental run needs it."""

    groups: list[list[str]] = Field(description="Its groups of source names (joint: one group of every source).")
    sources: dict[str, str] = Field(description="Source name -> content hash it trained on.")
    branches: list[BranchRef] = Field(description="The committed branch of each group (possibly an older run's).")
    seed: int | None = Field(None, description="split.seed the random groups were drawn with (random only).")


class BaselinesState(BaseModel):
    """``runs/<run-id>/baselines-state/baselines-state.json`` (a few KB)."""

    run_id: str = Field(description="The run that wrote this state.")
    created_at: float = Field(description="Unix time the state was committed.")
    fingerprint: str = Field(description="settings_fingerprint of the run.")
    joint: BaselineState | None = Field(None, description="None when the run trained no joint baseline.")
    random: BaselineState | None = Field(None, description="None when the run trained no random-split baseline.")


class BaselinePlan(BaseModel):
    """Which branches of one baseline this run trains and which it reuses."""

    label: Label
    mode: Literal["full", "incremental"] = Field(description="full: every branch trains (random: drawn again).")
    reason: str = Field(description="Why, in one sentence.")
    previous_run: str | None = Field(None, description="The finished run reused from.")
    groups: list[list[str]] = Field(description="Group k = branch k of this baseline.")
    reuse: dict[int, BranchRef] = Field(default_factory=dict, description="Group index -> branch reused as is.")
    retrain: list[int] = Field(default_factory=list, description="Group indices trained in this run.")
    placed: dict[str, int] = Field(default_factory=dict, description="New/changed source -> random group joined.")


def plan_baselines(cfg: MeritConfig, store: ArtifactStore, base: ModelRef, mixture: MixtureRef,
                   conflict: ConflictMatrix, plan: RerunPlan) -> list[BaselinePlan]:
    """The plans of the baselines ``cfg.baselines`` switches on (joint first; random only
    when the MERIT partition has K > 1 groups), reusing ``plan.previous_run``'s baseline
    branches when ``plan`` is incremental (module docstring).

    Raises:
        merit_core.store.StoreError: a branch to reuse fails its manifest check or holds
            other sources than its group (names the baseline, the branch and the run).
    """
    prev, why = _previous_state(cfg, store, base, plan)
    plans = []
    if cfg.baselines.joint:
        plans.append(_plan_joint(store, mixture, prev, why))
    if cfg.baselines.random_split and plan.partition.k > 1:
        plans.append(_plan_random(cfg, store, mixture, conflict, plan, prev, why))
    return plans


def _previous_state(cfg: MeritConfig, store: ArtifactStore, base: ModelRef,
                    plan: RerunPlan) -> tuple[BaselinesState | None, str]:
    """The baselines state of ``plan.previous_run`` (only in an incremental run), or None
    and the reason the baselines train in full."""
    if plan.mode != "incremental" or plan.previous_run is None:
        return None, "the MERIT split is a full run: every baseline branch trains"
    key = baselines_state_key(plan.previous_run)
    if not store.is_complete(key):
        return None, f"{plan.previous_run} committed no baselines state"
    try:
        state = BaselinesState.model_validate_json((store.fetch_dir(key) / STATE_FILE).read_text())
    except (StoreError, ValueError, OSError) as e:
        logger.warning("baselines state %s unreadable (%s); the baselines train in full", store.uri_for(key), e)
        return None, f"{plan.previous_run}'s baselines state is unreadable"
    if state.fingerprint != settings_fingerprint(cfg, base):
        return None, f"{plan.previous_run}'s baselines trained with other settings"
    return state, ""


def _full(label: Label, groups: list[list[str]], reason: str, prev: BaselinesState | None) -> BaselinePlan:
    return BaselinePlan(label=label, mode="full", reason=reason, groups=groups, retrain=list(range(len(groups))),
                        previous_run=prev.run_id if prev else None)


def _plan_joint(store: ArtifactStore, mixture: MixtureRef, prev: BaselinesState | None, why: str) -> BaselinePlan:
    group = list(mixture.names)
    if prev is None:
        return _full("joint", [group], why, None)
    if prev.joint is None:
        return _full("joint", [group], f"{prev.run_id} trained no joint baseline", prev)
    current = {s.name: s.content_hash for s in mixture.sources}
    if prev.joint.sources != current:
        return _full("joint", [group], f"its (source, content hash) set differs from {prev.run_id}'s: "
                     f"{_difference(prev.joint.sources, current)}", prev)
    ref = _verified(store, "joint", 0, prev.joint.branches[0], group, prev.run_id)
    return BaselinePlan(label="joint", mode="incremental", reason=f"same sources and content hashes as in "
                        f"{prev.run_id}: reused", previous_run=prev.run_id, groups=[group], reuse={0: ref})


def _plan_random(cfg: MeritConfig, store: ArtifactStore, mixture: MixtureRef, conflict: ConflictMatrix,
                 plan: RerunPlan, prev: BaselinesState | None, why: str) -> BaselinePlan:
    k = plan.partition.k

    def redraw(reason: str) -> BaselinePlan:
        return _full("random", partition_sources(cfg, conflict, mixture, strategy="random").groups, reason, prev)

    if prev is None:
        return redraw(why)
    old = prev.random
    if old is None:
        return redraw(f"{prev.run_id} trained no random-split baseline: drawn again")
    if old.seed != cfg.split.seed or len(old.groups) != k:
        return redraw(f"{prev.run_id}'s random split was drawn with split.seed = {old.seed} into "
                      f"{len(old.groups)} groups (now {cfg.split.seed}, {k}): drawn again")
    current = {s.name: s.content_hash for s in mixture.sources}
    names = list(conflict.names)
    groups = [[n for n in g if current.get(n) == old.sources[n]] for g in old.groups]
    todo = [n for n in names if current[n] != old.sources.get(n)]  # new or changed
    weights = plan.partition.weights  # what split.balance balances, as in random_split
    joined = random_placement([sum(weights[n] for n in g) for g in groups], [weights[n] for n in todo],
                              [[cfg.split.seed, _name_seed(n)] for n in todo])
    placed = dict(zip(todo, joined))
    for n, g in placed.items():
        groups[g].append(n)
    groups = [sorted(g, key=names.index) for g in groups]
    if any(not g for g in groups):
        return redraw(f"group(s) {[i for i, g in enumerate(groups) if not g]} of {prev.run_id}'s random split "
                      "would be left without sources: drawn again")
    retrain = [i for i, g in enumerate(groups) if {(n, current[n]) for n in g} != {
        (n, old.sources[n]) for n in old.groups[i]}]
    reuse = {i: _verified(store, "random", i, old.branches[i], g, prev.run_id)
             for i, g in enumerate(groups) if i not in retrain}
    return BaselinePlan(label="random", mode="incremental", reason=f"{prev.run_id}'s random groups kept: "
                        f"{len(retrain)} of {k} branches retrain", previous_run=prev.run_id, groups=groups,
                        reuse=reuse, retrain=retrain, placed=placed)


def _name_seed(name: str) -> int:
    """A stable 64-bit integer of a source name (part of its placement seed)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _difference(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    added = [n for n in new if n not in old]
    removed = [n for n in old if n not in new]
    changed = [n for n in new if n in old and new[n] != old[n]]
    return "; ".join(f"{what} {', '.join(ns)}" for what, ns in (("added", added), ("changed", changed),
                                                                  ("removed", removed)) if ns)


def _verified(store: ArtifactStore, label: str, index: int, ref: BranchRef, group: Sequence[str],
              run_id: str) -> BranchRef:
    try:
        return verified_branch(store, ref, group)
    except StoreError as e:
        raise StoreError(f"{label} baseline branch {index} of {run_id} cannot be reused: {e}") from e


def save_baselines_state(cfg: MeritConfig, store: ArtifactStore, base: ModelRef, mixture: MixtureRef,
                         plans: Sequence[BaselinePlan], branches: Mapping[str, Sequence[BranchRef]],
                         run_id: str) -> str | None:
    """Commit ``runs/<run-id>/baselines-state`` (after every baseline branch of ``plans``
    is committed; ``branches``: label -> its branches); return its URI, or None when no
    baseline ran."""
    if not plans:
        return None
    hashes = {s.name: s.content_hash for s in mixture.sources}
    parts = {}
    for p in plans:
        refs = sorted(branches[p.label], key=lambda b: b.index)
        parts[p.label] = BaselineState(groups=p.groups, sources={n: hashes[n] for g in p.groups for n in g},
                                       branches=[b.model_copy(update={"timing": None}) for b in refs],
                                       seed=cfg.split.seed if p.label == "random" else None)
    state = BaselinesState(run_id=run_id, created_at=time.time(), fingerprint=settings_fingerprint(cfg, base),
                           **parts)
    key = baselines_state_key(run_id)
    staging = store.staging_dir(key)
    (staging / STATE_FILE).write_text(state.model_dump_json(indent=2))
    return store.commit_dir(key, staging, metadata={"kind": "baselines-state"})


def with_baselines(summary: dict, plans: Sequence[BaselinePlan], branches: Mapping[str, Sequence[BranchRef]]) -> dict:
    """:func:`~merit_core.pipeline.incremental.rerun_summary` with the baselines added: the
    MERIT keys unchanged, plus ``baselines`` (label -> mode, reason, previous_run, placed),
    ``baseline_branches`` (rows like ``branches`` with a ``label``), ``baseline_tokens_total``,
    ``baseline_tokens_saved``, ``baseline_train_s_spent``, ``baseline_train_s_saved`` and,
    over MERIT and baseline branches together, ``all_tokens_total``, ``all_tokens_saved``,
    ``all_train_s_saved`` and ``all_saved_fraction`` (of tokens)."""
    rows = [{"label": p.label, "index": b.index, "action": "reused" if b.index in p.reuse else "retrained",
             "from_run": trained_in(b), "sources": b.sources, "trained_tokens": b.trained_tokens, "train_s": b.wall_s}
            for p in plans for b in sorted(branches[p.label], key=lambda b: b.index)]
    total = sum(r["trained_tokens"] for r in rows)
    saved = sum(r["trained_tokens"] for r in rows if r["action"] == "reused")
    s_saved = sum(r["train_s"] for r in rows if r["action"] == "reused")
    all_total = summary["tokens_total"] + total
    return {**summary,
            "baselines": {p.label: p.model_dump(include={"mode", "reason", "previous_run", "placed"}) for p in plans},
            "baseline_branches": rows, "baseline_tokens_total": total, "baseline_tokens_saved": saved,
            "baseline_train_s_spent": sum(r["train_s"] for r in rows if r["action"] == "retrained"),
            "baseline_train_s_saved": s_saved, "all_tokens_total": all_total,
            "all_tokens_saved": summary["tokens_saved"] + saved, "all_train_s_saved": summary["train_s_saved"] + s_saved,
            "all_saved_fraction": (summary["tokens_saved"] + saved) / all_total if all_total else 0.0}


def baselines_markdown(s: dict) -> str:
    """The baselines' part of the report's incremental section (:func:`with_baselines`);
    empty when no baseline ran."""
    if not s.get("baseline_branches"):
        return ""
    lines = ["Baselines: " + "; ".join(f"{label} — {b['mode']}, {b['reason']}" for label, b in s["baselines"].items())
             + "."]
    placed = s["baselines"].get("random", {}).get("placed")
    if placed:
        lines.append("Random split: " + ", ".join(f"{n} → group {g}" for n, g in placed.items()) + ".")
    lines += ["", "| baseline | branch | sources | action | trained in run | N_k | training s |",
              "|---|---:|---|---|---|---:|---:|"]
    for r in s["baseline_branches"]:
        lines.append(f"| {r['label']} | {r['index']} | {', '.join(r['sources'])} | {r['action']} | `{r['from_run']}` "
                     f"| {r['trained_tokens']} | {r['train_s']:.1f} |")
    lines += ["", (f"Baselines: {s['baseline_tokens_saved']} of {s['baseline_tokens_total']} training tokens reused, "
                   f"{s['baseline_train_s_saved']:.1f} s of training saved (this run trained "
                   f"{s['baseline_train_s_spent']:.1f} s). MERIT and baselines together: {s['all_tokens_saved']} of "
                   f"{s['all_tokens_total']} branch training tokens saved ({s['all_saved_fraction']:.0%}), "
                   f"{s['all_train_s_saved']:.1f} s.")]
    return "\n".join(lines)
