"""Stage *merge-readiness diagnostics* (paper appendix B; MERIT_SPEC "Theory the
diagnostics compute"), switched on by ``eval.diagnostics``.

On a small fixed sample of held-out examples (``eval.diagnostics_examples``, taken in
turn from each source), for the MERIT branches θ_k, the merged θ̄ and (when trained) the joint
model:

- the linear-mode-connectivity loss barrier on each path θ_k → θ̄ at ``eval.lmc_points``
  points (:func:`merit_core.diagnostics.lmc_barrier`; paper: 21 points, barrier 0.0 on all
  paths);
- the merge gain G = Σ w_k L(θ_k) − L(θ̄) from the path end points
  (:func:`merit_core.diagnostics.merge_gain`);
- the loss increase under Gaussian weight noise σ ∈ {0.01, 0.05, 0.1} (relative to
  each tensor's RMS) of θ̄ and joint (:func:`merit_core.diagnostics.noise_flatness`);
- displacement contraction: Σ w_k ||δ_k||² = ||δ̄||² + Σ w_k ||δ_k − δ̄||², the ratio
  ||δ̄|| / sqrt(Σ w_k ||δ_k||²) ≤ 1 and ||θ_joint − θ(0)|| / ||θ̄ − θ(0)|| (paper Table 1:
  2.43–2.92) (:func:`merit_core.diagnostics.contraction`).

Cost: L(θ̄) is measured once and reused as every path's end point and as the noise
baseline, so the stage makes K·(points − 1) + 1 forward passes over the sample for the
paths and 3 + 4 for the noise (merged, joint), on float32 weights
(docs/incremental.md gives measured times).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from merit_core.batching import mean_response_loss
from merit_core.config import MeritConfig
from merit_core.diagnostics import contraction, lmc_barrier, merge_gain, noise_flatness
from merit_core.evaluate.inputs import pad_token_id
from merit_core.models import load_model
from merit_core.pipeline.mixture import load_split
from merit_core.refs import BranchRef, MixtureRef, ModelRef
from merit_core.store import ArtifactStore

logger = logging.getLogger("merit")

SIGMAS = (0.01, 0.05, 0.1)


def merge_readiness(cfg: MeritConfig, store: ArtifactStore, base: ModelRef, branches: Sequence[BranchRef],
                    merged: ModelRef, mixture: MixtureRef, joint: ModelRef | None = None) -> dict:
    """The diagnostics of the module docstring.

    Args:
        branches: the MERIT branches θ_k; their trained tokens N_k are the weights.
        merged: θ̄ of those branches. joint: the joint-training model, if trained.

    Returns:
        JSON-able dict: ``examples`` (count), ``lmc`` (per branch: index, barrier,
        loss_branch, loss_merged), ``merge_gain`` (nats/token), ``noise`` (label ->
        noise_flatness dict), ``contraction`` (contraction dict), ``seconds``.

    Raises:
        ValueError: no held-out example in the mixture.
        merit_core.store.StoreError: a model directory fails its manifest check.
    """
    t0 = time.perf_counter()
    per_source = [load_split(store, s, "heldout") for s in mixture.sources]
    examples = []
    for i in range(max((len(p) for p in per_source), default=0)):
        examples += [p[i] for p in per_source if i < len(p)]
    examples = examples[:cfg.eval.diagnostics_examples]
    if not examples:
        raise ValueError("merge_readiness: the mixture has no held-out examples")
    ordered = sorted(branches, key=lambda b: b.index)
    merged_dir = store.fetch_dir(merged.key)
    branch_dirs = [store.fetch_dir(b.key) for b in ordered]
    weights = [float(b.trained_tokens) for b in ordered]
    model, tokenizer = load_model(merged_dir, dtype=cfg.model.dtype)
    pad = pad_token_id(tokenizer)
    bs, points = cfg.eval.batch_size, cfg.eval.lmc_points
    merged_loss = mean_response_loss(model, examples, pad, bs)  # every path's end point, the noise baseline
    lmc = []
    for b, d in zip(ordered, branch_dirs):
        res = lmc_barrier(model, d, merged_dir, examples, pad, points=points, batch_size=bs, loss_b=merged_loss)
        lmc.append({"index": b.index, "barrier": res["barrier"], "loss_branch": res["loss_a"],
                    "loss_merged": res["loss_b"], "losses": res["losses"]})
    noise = {"merged": noise_flatness(model, examples, pad, SIGMAS, batch_size=bs, base_loss=merged_loss)}
    joint_dir = None
    if joint is not None:
        joint_dir = store.fetch_dir(joint.key)
        joint_model, _ = load_model(joint_dir, dtype=cfg.model.dtype)
        noise["joint"] = noise_flatness(joint_model, examples, pad, SIGMAS, batch_size=bs)
        del joint_model
    contr = contraction(store.fetch_dir(base.key), [str(d) for d in branch_dirs], weights, merged_dir=merged_dir,
                        joint_dir=joint_dir)
    gain = merge_gain([x["loss_branch"] for x in lmc], weights, lmc[0]["loss_merged"])
    seconds = time.perf_counter() - t0
    logger.info("merge-readiness diagnostics on %d examples in %.1f s: max LMC barrier %.4f, merge gain %.4f",
                len(examples), seconds, max(x["barrier"] for x in lmc), gain)
    return {"examples": len(examples), "points": points, "lmc": lmc, "merge_gain": gain, "noise": noise, "contraction": contr,
            "seconds": seconds}


def readiness_markdown(d: dict) -> str:
    """The report section of :func:`merge_readiness`."""
    lines = [f"On {d['examples']} held-out examples, {d['seconds']:.0f} s (paper appendix B).", "",
             (f"Linear-mode connectivity θ_k → θ̄ ({d.get('points', 21)} points; paper: 21, barrier 0.0 on "
              "every path):"), "",
             "| branch | L(θ_k) | L(θ̄) | barrier |", "|---:|---:|---:|---:|"]
    lines += [f"| {x['index']} | {x['loss_branch']:.4f} | {x['loss_merged']:.4f} | {x['barrier']:.4f} |"
              for x in d["lmc"]]
    lines += ["", f"Merge gain G = Σ w_k L(θ_k) − L(θ̄) = {d['merge_gain']:.4f} nats/token.", "",
              "Loss increase under Gaussian weight noise (σ relative to each tensor's RMS):", "",
              "| model | loss | " + " | ".join(f"σ = {s:g}" for s in SIGMAS) + " |",
              "|---|---:|" + "---:|" * len(SIGMAS)]
    for label, n in d["noise"].items():
        lines.append(f"| {label} | {n['base_loss']:.4f} | " + " | ".join(f"{x:+.4f}" for x in n["increase"]) + " |")
    c = d["contraction"]
    lines += ["", f"Displacement contraction: ||δ̄|| / sqrt(Σ w_k ||δ_k||²) = {c['contraction_ratio']:.3f} "
              f"(≤ 1; identity error {c['identity_rel_error']:.1e})"
              + (f"; ||θ_joint − θ(0)|| / ||θ̄ − θ(0)|| = {c['joint_over_merged']:.2f} (paper: 2.43–2.92)"
                 if "joint_over_merged" in c else "") + "."]
    return "\n".join(lines)
