"""Incremental runs (issue 18): new sources placed into a finished run's groups, only the
changed groups retrained; the forecast of partitions; merge-readiness diagnostics in the
report. Maths on small matrices, flows on the tiny model under prefect_test_harness."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from prefect.testing.utilities import prefect_test_harness
from safetensors.numpy import load_file

from merit_core.config import MeritConfig
from merit_core.conflict.matrix import conflict_matrix
from merit_core.split import pca_split, random_split, split_score
from merit_core.split.forecast import forecast_partitions, suggest_r
from merit_core.split.pca import pca_scores
from merit_core.split.placement import fit_axes, max_principal_angle_deg
from merit_core.store.manifest import verify_manifest
from tests.helpers import write_jsonl_sources

# --- maths ---------------------------------------------------------------------------------


def _centres(dim: int = 64) -> np.ndarray:
    """Four gradient directions in a 2 × 2 design: ±e3 on top of 4e1 or 4e2."""
    e = np.eye(dim)
    return np.stack([4 * e[0] + 2 * e[2], 4 * e[0] - 2 * e[2], 4 * e[1] + 2 * e[2], 4 * e[1] - 2 * e[2]])


def _clustered_gradients(rng: np.random.Generator, per: int = 4, dim: int = 64) -> np.ndarray:
    """Four clusters of gradients around :func:`_centres`, ``per`` sources each (cluster j =
    sources per·j .. per·j + per − 1)."""
    return np.concatenate([c + 0.3 * rng.normal(size=(per, dim)) for c in _centres(dim)])


def test_fit_axes_reproduces_the_split_and_places_sources_with_its_rule():
    rng = np.random.default_rng(0)
    g = _clustered_gradients(rng)
    c = conflict_matrix(g)
    w = np.full(len(g), 20.0)  # equal sizes: the weighted medians fall between the clusters
    split = pca_split(c, w, 2)
    axes, scores = fit_axes(c, split.groups, 2)
    # the same PCA and sign as pca_split
    np.testing.assert_allclose(scores, pca_scores(c, 2, "max_loading")[0], atol=1e-10)
    # placing a fitted source with its own row of C gives back its group
    assert sorted(split.groups) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    group_of = {i: k for k, grp in enumerate(split.groups) for i in grp}
    assert axes.place(axes.project(c)) == [group_of[i] for i in range(len(g))]
    # a new source near cluster j: its row of C against the fitted sources, projected by hand
    for j in range(4):
        new = _centres()[j] + 0.3 * rng.normal(size=64)
        row = conflict_matrix(np.vstack([g, new]))[-1, :-1]
        z = (row - c.mean(axis=0)) @ axes.components.T
        np.testing.assert_allclose(axes.project(row)[0], z, atol=1e-12)
        # by hand down the tree: bit 1 when the score reaches the cut's threshold
        b0 = int(z[0] >= axes.thresholds[""])
        b1 = int(z[1] >= axes.thresholds[str(b0)])
        assert axes.place(z) == [2 * b0 + b1]
        # and it lands with the sources of its own cluster (cluster j = sources 4j .. 4j+3)
        assert axes.place(z)[0] == group_of[4 * j]


def test_principal_angle():
    a = np.array([[1.0], [0.0], [0.0]])
    b = np.array([[math.cos(math.radians(30))], [math.sin(math.radians(30))], [0.0]])
    assert max_principal_angle_deg(a, a * -3) == pytest.approx(0.0, abs=1e-6)
    assert max_principal_angle_deg(a, b) == pytest.approx(30.0, abs=1e-6)
    assert max_principal_angle_deg(a, np.array([[0.0], [0.0], [1.0]])) == pytest.approx(90.0)
    assert max_principal_angle_deg(a, np.zeros((3, 1))) == 90.0  # lost rank


def test_forecast_scores_candidates_with_the_split_score():
    rng = np.random.default_rng(1)
    g = _clustered_gradients(rng)
    c = conflict_matrix(g)
    w = np.full(len(g), 20.0)
    f = forecast_partitions(c, w, 2, seed=3, n_random=50)
    names = [x["name"] for x in f["candidates"]]
    assert names[0] == "PCA (MERIT-2D)" and names[1] == "k-means" and names[2].startswith("random balanced")
    assert f["candidates"][0]["score"] == pytest.approx(split_score(c, w, pca_split(c, w, 2).groups))
    rnd = [split_score(c, w, random_split(w, 4, 3 + i).groups) for i in range(50)]
    assert f["random"]["mean"] == pytest.approx(np.mean(rnd)) and f["random"]["max"] == pytest.approx(max(rnd))
    # four clean clusters: PCA separates them and beats every random split
    assert f["candidates"][0]["score"] > max(0.5, f["random"]["max"]) and f["pca_beats_random"] == 1.0
    # a 2 × 2 design: two PCs above the isotropic share 1/(T-1) = 1/15, the third (noise) below
    assert f["explained_variance_ratio"][1] > 1 / 15 > f["explained_variance_ratio"][2] and f["suggested_r"] == 2


def test_random_placement_extends_random_split_balanced_and_seeded():
    from merit_core.split.baselines import random_placement

    rng = np.random.default_rng(5)
    w = rng.uniform(1, 10, size=12)
    split = random_split(w[:8], 4, seed=2)
    loads = np.array([w[g].sum() for g in split.groups])
    seeds = [[2, i] for i in range(8, 12)]
    placed = random_placement(loads, w[8:], seeds)
    after = loads.copy()
    for i, g in enumerate(placed):
        after[g] += w[8 + i]
    # balance bound of random_split kept: spread ≤ max(spread before, largest new weight)
    assert after.max() - after.min() <= max(loads.max() - loads.min(), w[8:].max()) + 1e-12
    assert random_placement(loads, w[8:], seeds) == placed  # deterministic
    # by hand: visited in the order of each source's first draw, each to the lightest group
    load, expect = loads.copy(), [0] * 4
    for i in np.argsort([np.random.default_rng(s).random() for s in seeds], kind="stable"):
        expect[i] = int(np.argmin(load))
        load[expect[i]] += w[8 + i]
    assert placed == expect
    # equally light groups: the tie is a seeded draw among them, never a heavier group
    picks = {random_placement([0.0, 5.0, 0.0], [1.0], [[0, s]])[0] for s in range(20)}
    assert picks == {0, 2}
    with pytest.raises(ValueError, match="weights must be > 0"):
        random_placement([1.0, 2.0], [0.0], [[0, 1]])


def test_suggest_r_rule():
    assert suggest_r([0.9, 0.05, 0.03], 16)[0] == 1            # rank-1 conflicts
    assert suggest_r([1 / 15] * 8, 16)[0] == 0                   # isotropic: nothing above 1/(T-1)
    assert suggest_r([0.4, 0.3, 0.2, 0.1], 6)[0] == 1            # capped: floor(log2(6/2)) = 1
    r, why = suggest_r([0.5, 0.3, 0.05], 16)
    assert r == 2 and "PC3 is at or below it" in why


# --- flows ---------------------------------------------------------------------------------

NAMES = ["alpha", "beta", "gamma", "delta", "epsilon"]


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _config(tmp_path, model_dir, names, baselines: bool = False, **run) -> MeritConfig:
    specs = write_jsonl_sources(tmp_path / "data", NAMES, n=32)
    return MeritConfig.model_validate({
        "run": {"name": "incr", **run},
        "model": {"source": str(model_dir)},
        "data": {"sources": [s for s in specs if s["name"] in names], "max_length": 64, "heldout_min": 4,
                 "heldout_fraction": 0.2},
        "conflict": {"calibration_size": 8, "sketch": "countsketch", "sketch_dim": 512, "batch_size": 8},
        "split": {"r": 1},
        "train": {"learning_rate": 1e-3, "batch_size": 8, "epochs": 1, "save_steps": 50, "logging_steps": 1},
        "eval": {"batch_size": 8, "max_examples_per_source": 4, "max_new_tokens": 2, "generate": False},
        "baselines": {"joint": baselines, "random_split": baselines},
        "store": {"uri": str(tmp_path / "store")},
    })


def _files(store, key) -> dict[str, str]:
    return {k: v["sha256"] for k, v in verify_manifest(store / key)["files"].items()}


def _assert_token_weighted(store, branches: list[dict], merged_key: str) -> None:
    """merged = Σ_k N_k θ_k / Σ_j N_j of ``branches``, computed here in float64."""
    ordered = sorted(branches, key=lambda b: b["index"])
    n = np.array([b["trained_tokens"] for b in ordered], dtype=np.float64)
    branch_w = [load_file(store / b["key"] / "model.safetensors") for b in ordered]
    merged = load_file(store / merged_key / "model.safetensors")
    assert set(merged) == set(branch_w[0])
    for name, tensor in merged.items():
        expect = sum(wk * b[name].astype(np.float64) for wk, b in zip(n / n.sum(), branch_w))
        np.testing.assert_allclose(tensor, expect, rtol=1e-5, atol=1e-6, err_msg=name)


def test_added_source_retrains_only_its_group(harness, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    from flows.merit import merit

    store = tmp_path / "store"
    first = merit(config=_config(tmp_path, tiny_model_dir, NAMES[:4], baselines=True))
    assert first["rerun"]["mode"] == "full" and "no finished run" in first["rerun"]["reason"]
    old = {b["index"]: b for b in first["branches"]["merit"]}
    old_files = {k: _files(store, b["key"]) for k, b in old.items()}

    # (a) a fifth source: auto mode (threshold 90°, so the structure check cannot veto) is incremental
    cfg = _config(tmp_path, tiny_model_dir, NAMES, baselines=True, resplit_angle_deg=90.0)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"diagnostics": True, "lmc_points": 5,
                                                                     "diagnostics_examples": 6})})
    second = merit(config=cfg)
    rerun = second["rerun"]
    assert rerun["mode"] == "incremental" and rerun["previous_run"] == first["run_id"]
    assert rerun["added"] == ["epsilon"] and rerun["removed"] == rerun["changed"] == []
    joined = rerun["placed"]["epsilon"]
    groups = second["partition"]["groups"]
    assert groups[joined] == sorted([*first["partition"]["groups"][joined], "epsilon"], key=NAMES.index)
    assert [g for k, g in enumerate(groups) if k != joined] == [
        g for k, g in enumerate(first["partition"]["groups"]) if k != joined]
    new = {b["index"]: b for b in second["branches"]["merit"]}
    for row in rerun["branches"]:
        k = row["index"]
        if k == joined:  # exactly the fifth source's group retrains, in this run
            assert row["action"] == "retrained" and row["from_run"] == second["run_id"]
            assert new[k]["key"].startswith(f"runs/{second['run_id']}/") and "epsilon" in new[k]["sources"]
        else:  # the others are the first run's branches, byte for byte
            assert row["action"] == "reused" and row["from_run"] == first["run_id"]
            assert new[k]["key"] == old[k]["key"] and _files(store, new[k]["key"]) == old_files[k]
            assert not (store / "runs" / second["run_id"] / "merit" / "branches" / str(k)).exists()
    assert rerun["tokens_saved"] == sum(old[k]["trained_tokens"] for k in old if k != joined)
    assert rerun["tokens_total"] == sum(b["trained_tokens"] for b in new.values())

    # merged = Σ_k N_k θ_k / Σ_j N_j of the final branches, computed here in float64
    _assert_token_weighted(store, second["branches"]["merit"], second["models"]["merit"]["key"])

    # the baselines: joint retrains (its sources changed); the random groups epsilon did not join are reused
    assert rerun["baselines"]["joint"]["mode"] == "full" and "added epsilon" in rerun["baselines"]["joint"]["reason"]
    (joint,) = second["branches"]["joint"]
    assert joint["key"].startswith(f"runs/{second['run_id']}/joint/") and "epsilon" in joint["sources"]
    assert rerun["baselines"]["random"]["mode"] == "incremental"
    joined_r = rerun["baselines"]["random"]["placed"]["epsilon"]
    old_rnd = {b["index"]: b for b in first["branches"]["random"]}
    new_rnd = {b["index"]: b for b in second["branches"]["random"]}
    assert sorted(new_rnd[joined_r]["sources"]) == sorted([*old_rnd[joined_r]["sources"], "epsilon"])
    assert new_rnd[joined_r]["key"].startswith(f"runs/{second['run_id']}/random/")
    for k in set(new_rnd) - {joined_r}:
        assert new_rnd[k]["key"] == old_rnd[k]["key"] and _files(store, new_rnd[k]["key"]) == _files(
            store, old_rnd[k]["key"])
        assert not (store / "runs" / second["run_id"] / "random" / "branches" / str(k)).exists()
    actions = {(r["label"], r["index"]): (r["action"], r["from_run"]) for r in rerun["baseline_branches"]}
    assert actions[("joint", 0)] == ("retrained", second["run_id"])
    assert actions[("random", joined_r)] == ("retrained", second["run_id"])
    assert all(actions[("random", k)] == ("reused", first["run_id"]) for k in set(new_rnd) - {joined_r})
    assert rerun["baseline_tokens_saved"] == sum(old_rnd[k]["trained_tokens"] for k in old_rnd if k != joined_r)
    assert rerun["all_tokens_saved"] == rerun["tokens_saved"] + rerun["baseline_tokens_saved"]
    # the random merge is redone with the new token weights
    assert second["models"]["random"]["key"] == f"runs/{second['run_id']}/random/merged"
    _assert_token_weighted(store, second["branches"]["random"], second["models"]["random"]["key"])

    # the report says so, with the forecast and the diagnostics
    md = (store / "runs" / second["run_id"] / "report" / "report.md").read_text()
    assert "## Incremental run" in md and f"`{first['run_id']}`" in md and "reused" in md
    assert "| random |" in md and "| joint |" in md and "MERIT and baselines together" in md
    assert "## Forecast before training" in md and "k-means" in md and "Suggested r" in md
    assert "## Merge-readiness diagnostics" in md and "barrier" in md
    d = second["diagnostics"]
    assert len(d["lmc"]) == 2 and all(x["barrier"] >= 0 for x in d["lmc"])
    assert d["examples"] == 6 and d["points"] == 5 and all(len(x["losses"]) == 5 for x in d["lmc"])
    assert len({x["loss_merged"] for x in d["lmc"]}) == 1 == len({d["noise"]["merged"]["base_loss"], d["lmc"][0]["loss_merged"]})
    assert d["contraction"]["contraction_ratio"] <= 1 + 1e-9 and d["contraction"]["identity_rel_error"] < 1e-6
    assert d["contraction"]["merged_residual_sq"] < 1e-6 * d["contraction"]["mean_sq_norm"]
    assert any(t["stage"] == "merge-readiness diagnostics" for t in second["timings"])

    # (b) forced full mode: the same addition retrains every branch in the new run, baselines included
    third = merit(config=_config(tmp_path, tiny_model_dir, NAMES, baselines=True, rerun="full"))
    r3 = third["rerun"]
    assert r3["mode"] == "full" and r3["tokens_saved"] == 0 and r3["baseline_tokens_saved"] == 0
    assert {p["mode"] for p in r3["baselines"].values()} == {"full"}
    assert all(r["action"] == "retrained" and r["from_run"] == third["run_id"]
               for r in r3["branches"] + r3["baseline_branches"])
    assert len(r3["baseline_branches"]) == 3  # joint + 2 random groups
    assert all(b["key"].startswith(f"runs/{third['run_id']}/") for label in ("merit", "joint", "random")
               for b in third["branches"][label])

    # (c) the identical config again, incrementally: nothing retrains, joint and random are reused
    same = merit(config=_config(tmp_path, tiny_model_dir, NAMES, baselines=True, rerun="incremental"))
    rs = same["rerun"]
    assert rs["mode"] == "incremental" and rs["previous_run"] == third["run_id"] and rs["added"] == []
    assert all(r["action"] == "reused" and r["from_run"] == third["run_id"]
               for r in rs["branches"] + rs["baseline_branches"])
    assert {p["mode"] for p in rs["baselines"].values()} == {"incremental"} and rs["baselines"]["random"]["placed"] == {}
    assert rs["all_tokens_saved"] == rs["all_tokens_total"] > 0 and rs["all_saved_fraction"] == 1.0
    for label in ("merit", "joint", "random"):
        assert [b["key"] for b in same["branches"][label]] == [b["key"] for b in third["branches"][label]]
        assert not (store / "runs" / same["run_id"] / label / "branches").exists()
    assert same["models"]["joint"]["key"] == third["branches"]["joint"][0]["key"]
    _assert_token_weighted(store, same["branches"]["random"], same["models"]["random"]["key"])
    assert verify_manifest(store / "runs" / same["run_id"] / "baselines-state")

    # a removed source invalidates its group: only that branch retrains
    fourth = merit(config=_config(tmp_path, tiny_model_dir, [n for n in NAMES if n != "beta"], rerun="incremental"))
    r4 = fourth["rerun"]
    assert r4["mode"] == "incremental" and r4["removed"] == ["beta"]
    beta_group = next(k for k, g in enumerate(third["partition"]["groups"]) if "beta" in g)
    assert [r["index"] for r in r4["branches"] if r["action"] == "retrained"] == [beta_group]
    state = json.loads((store / "runs" / fourth["run_id"] / "merit" / "split-state" / "split-state.json").read_text())
    assert "beta" not in state["sources"] and state["groups"] == fourth["partition"]["groups"]


def test_changed_settings_or_forced_full_split_again(tmp_path):
    """Unit test of the decision: a finished run with other training settings is not reused."""
    from merit_core.pipeline.incremental import settings_fingerprint
    from merit_core.refs import ModelRef

    base = ModelRef(key="models/abc", uri="x")
    cfg = MeritConfig()
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 1e-3})})
    threads = cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": 3})})
    assert settings_fingerprint(cfg, base) != settings_fingerprint(other, base)
    assert settings_fingerprint(cfg, base) == settings_fingerprint(threads, base)
    assert settings_fingerprint(cfg, base) != settings_fingerprint(cfg, base.model_copy(update={"key": "models/d"}))
