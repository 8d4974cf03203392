"""TQ, SACo (paper protocol and offlab's continuous measures) and the diagnostics, on real MuJoCo data."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from offlab.data import metrics as M
from offlab.data.schema import Dataset, DatasetCard
from offlab.envs.make import env_spaces
from offlab.errors import DataValidationError, EnvError, OfflabError
from tests.helpers import make_sim_dataset

NO_BC = M.QualityConfig(bc=False)


def linear_policy(env_id: str, seed: int = 0, scale: float = 0.5):
    """A fixed deterministic linear policy a = tanh(W s): narrow, expert-like data (one action per state)."""
    sp = env_spaces(env_id)
    w = np.random.default_rng(seed).normal(size=(sp.action_dim, sp.obs_shape[0])) * scale
    return lambda obs: np.tanh(w @ obs)


@pytest.fixture(scope="module")
def hopper_linear():
    return make_sim_dataset("Hopper-v5", steps=2000, seed=1, name="hopper-linear", policy=linear_policy("Hopper-v5"))


@pytest.fixture(scope="module")
def hopper_random_ref():
    """An independent random-action dataset: a broad, replay-like reference."""
    return make_sim_dataset("Hopper-v5", steps=2000, seed=5, name="hopper-random-ref")


def test_saco_of_the_reference_against_itself_is_one(hopper_random):
    n = M.quality(hopper_random, hopper_random, NO_BC).numbers
    assert n["saco_paper"]["saco"] == 1.0
    assert n["saco_grid"]["saco"] == 1.0 and n["saco_grid"]["saco_std"] == 0.0
    assert n["saco_h"]["delta_h"] == 0.0 and n["saco_h"]["saco_h"] == 1.0 and n["saco_h"]["saco_h_pd"] == 1.0
    assert n["coverage"]["coverage_at_k"] == 1.0 and n["coverage"]["cov_r0.5"] == 1.0
    assert n["coverage"]["out_of_support"] == 0.0
    assert n["reference"]["id"] == "hopper-tiny"


def test_saco_never_increases_when_transitions_are_removed(hopper_random, hopper_linear):
    ref = M.pooled_reference([hopper_random, hopper_linear])
    x = M.state_actions(hopper_random)
    keep = np.arange(len(x))
    rng = np.random.default_rng(0)
    values = []
    while len(keep) > 100:
        values.append(M.saco_paper(x[keep], ref.x)["saco"])
        keep = np.sort(rng.choice(keep, size=int(0.7 * len(keep)), replace=False))
    assert all(b <= a for a, b in zip(values, values[1:], strict=False)), values
    assert values[-1] < values[0]


def test_every_measure_but_the_first_rows_rule_is_invariant_to_row_order(hopper_random, hopper_linear):
    # small caps so that every measure subsamples (2,000 rows > 1,000)
    cfg = M.QualityConfig(grid_rows=1000, entropy_rows=800, coverage_rows=1000, coverage_queries=300, bc=False)
    ref = M.pooled_reference([hopper_random, hopper_linear])
    x = M.state_actions(hopper_random)
    perm = np.random.default_rng(1).permutation(len(x))
    a, _ = M.coverage_measures(x, ref, cfg)
    b, _ = M.coverage_measures(x[perm], ref, cfg)
    for section in ("saco_grid", "saco_h", "coverage"):
        for k, v in a[section].items():
            assert b[section][k] == pytest.approx(v, rel=1e-12, abs=1e-12), (section, k)
    assert a["saco_paper"]["saco"] == b["saco_paper"]["saco"]  # N <= 100k: the first-rows rule takes all rows


def test_tq_of_the_random_reference_is_zero_and_of_the_expert_reference_is_one(hopper_random, hopper_linear):
    g_random = M.tq_returns(hopper_random).mean()
    g_expert = M.tq_returns(hopper_linear).mean()
    assert g_random != g_expert
    for ds, expected in ((hopper_random, 0.0), (hopper_linear, 1.0)):
        card = dataclasses.replace(ds.card, ref_min_score=float(g_random), ref_max_score=float(g_expert))
        n = M.quality(ds.with_card(**dataclasses.asdict(card)), None, NO_BC).numbers
        assert n["tq"]["tq"] == pytest.approx(expected, abs=1e-12)
        assert n["returns"]["normalized_mean"] == pytest.approx(100 * expected, abs=1e-9)
    # D4RL reference scores: a mean return at the random score is 0, at the expert score 1
    assert M.trajectory_quality(-20.272305, -20.272305, 3234.3) == 0.0
    assert M.trajectory_quality(3234.3, -20.272305, 3234.3) == 1.0


def test_tq_leaves_out_an_episode_cut_by_the_collection_budget(hopper_random):
    done = M.complete_episodes(hopper_random)
    assert not done[-1] and done[:-1].all()  # make_sim_dataset stops mid-episode
    assert len(M.tq_returns(hopper_random)) == hopper_random.n_episodes - 1


def _rescaled(ds: Dataset, dim: int, factor: float) -> Dataset:
    obs, nxt = ds.obs.copy(), ds.next_obs.copy()
    obs[:, dim] *= factor
    nxt[:, dim] *= factor
    return dataclasses.replace(ds, obs=obs, next_obs=nxt)


def test_standardised_coverage_measures_are_unchanged_by_rescaling_one_state_dimension(hopper_random, hopper_linear,
                                                                                       hopper_random_ref):
    base = M.quality(hopper_linear, hopper_random_ref, NO_BC).numbers
    scaled = M.quality(_rescaled(hopper_linear, 5, 1000.0), _rescaled(hopper_random_ref, 5, 1000.0), NO_BC).numbers
    for section in ("saco_paper", "saco_grid", "saco_h", "coverage"):
        for k, v in base[section].items():
            if isinstance(v, float) and k not in ("h", "h_ref"):
                assert scaled[section][k] == pytest.approx(v, rel=1e-5, abs=1e-9), (section, k)
    # the raw (unstandardised) entropy does move by log(1000): the invariance is the standardisation's doing
    raw = M.kl_entropy(M.state_actions(hopper_linear).astype(np.float64))[0]
    raw_scaled = M.kl_entropy(M.state_actions(_rescaled(hopper_linear, 5, 1000.0)).astype(np.float64))[0]
    assert raw_scaled - raw > 3.0


def test_random_actions_saturate_the_naive_count_while_knn_measures_separate_random_from_expert_like():
    # HalfCheetah (d = 23): the case the paper's own D4RL counts saturate on (99,994 of 100k cells)
    env = "HalfCheetah-v5"
    reference = M.reference_from_dataset(make_sim_dataset(env, steps=2000, seed=5, name="cheetah-replay-like"))
    random = M.quality(make_sim_dataset(env, steps=2000, seed=0, name="cheetah-random"), reference, NO_BC).numbers
    narrow = M.quality(make_sim_dataset(env, steps=2000, seed=1, name="cheetah-linear", policy=linear_policy(env)),
                       reference, NO_BC).numbers
    assert random["saco_paper"]["saturated"] and random["saco_paper"]["occupancy"] >= 0.95
    assert random["headline"] == "saco_h"
    # the count barely tells them apart ...
    assert abs(random["saco_paper"]["saco"] - narrow["saco_paper"]["saco"]) < 0.1
    # ... the k-NN measures do
    assert random["saco_h"]["saco_h_pd"] > narrow["saco_h"]["saco_h_pd"] + 0.2
    assert random["coverage"]["coverage_at_k"] > 0.8 > 0.2 > narrow["coverage"]["coverage_at_k"]
    assert narrow["coverage"]["out_of_support"] > 0.5 > random["coverage"]["out_of_support"]


def test_knn_entropy_matches_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    for p in (2, 5):
        z = rng.normal(size=(4000, p))
        h, dups = M.kl_entropy(z, k=5)
        assert dups == 0
        assert h == pytest.approx(0.5 * p * np.log(2 * np.pi * np.e), abs=0.06 * p)
    h2, _ = M.kl_entropy(2.0 * z, k=5)  # scaling by 2 adds p log 2
    assert h2 - M.kl_entropy(z, k=5)[0] == pytest.approx(5 * np.log(2.0), abs=1e-9)
    h_dup, dups = M.kl_entropy(np.vstack([z, z[:100]]), k=5)
    assert dups == 100 and h_dup == pytest.approx(M.kl_entropy(z, k=5)[0], abs=1e-12)


def test_brute_force_index_above_15_dims_gives_the_kd_trees_exact_neighbours():
    """p > 15 switches to the faiss flat index; after its float64 re-ranking, distances and neighbours are
    the KD-tree's (exact) ones, and the bounded query marks far neighbours the same way."""
    rng = np.random.default_rng(3)
    points = rng.normal(size=(3000, 6)) @ rng.normal(size=(6, 18)) + 0.05 * rng.normal(size=(3000, 18))
    queries = points[:200] + 0.3 * rng.normal(size=(200, 18))
    brute, tree = M.NeighbourIndex(points), M.NeighbourIndex(points, brute_above=99)
    assert brute.brute and not tree.brute
    d_b, i_b = brute.query(queries, 5)
    d_t, i_t = tree.query(queries, 5)
    np.testing.assert_allclose(d_b, d_t, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(i_b, i_t)
    np.testing.assert_allclose(brute.kth_other(np.arange(50), 5), tree.kth_other(np.arange(50), 5), rtol=1e-12)
    bound = float(np.median(d_t[:, 0]))
    d_bb, i_bb = brute.query(queries, 1, upper_bound=bound)
    d_tb, i_tb = tree.query(queries, 1, upper_bound=bound)
    np.testing.assert_array_equal(np.isinf(d_bb), np.isinf(d_tb))
    np.testing.assert_array_equal(i_bb, i_tb)


def test_a_faiss_search_leaves_torchs_thread_count_as_it_was():
    """faiss and torch load one OpenMP runtime: a search that set its thread count and left it would change the
    torch intra-op threads of the training run that logged its dataset's quality (found as runs 15x slower)."""
    code = ("import torch; torch.set_num_threads(5); x = torch.ones(64, 64); x @ x; before = torch.get_num_threads(); "
            "import numpy as np; from offlab.data import metrics as M; "
            "idx = M.NeighbourIndex(np.random.default_rng(0).normal(size=(500, 17))); assert idx.brute; "
            "idx.query(idx.points[:50], 3); x @ x; idx.query(idx.points[:50], 3); print(before, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["5", "5"]


def test_paper_cells_follow_np_digitize_over_five_edges():
    lo, hi = np.array([0.0]), np.array([4.0])
    x = np.array([[-1.0], [0.0], [0.5], [3.9], [4.0], [7.0]])
    assert M.paper_cells(x, lo, hi).ravel().tolist() == [0, 1, 1, 4, 5, 5]
    r = M.saco_paper(x, np.array([[0.0], [4.0]]))  # limits from the reference's min/max
    assert (r["unique"], r["unique_ref"], r["saco"]) == (4, 2, 2.0)


def test_a_dataset_far_from_the_reference_covers_none_of_it(hopper_random, hopper_random_ref):
    shifted = dataclasses.replace(hopper_random, obs=hopper_random.obs + 100.0, next_obs=hopper_random.next_obs + 100.0)
    n = M.quality(shifted, hopper_random_ref, NO_BC).numbers
    assert n["coverage"]["coverage_at_k"] == 0.0 and n["coverage"]["cov_r4"] == 0.0
    assert n["coverage"]["out_of_support"] == 1.0


def test_diagnostics_count_duplicates_discontinuities_and_bad_values(hopper_random):
    ds = hopper_random
    first = ds.episode_starts[1]
    rows = np.r_[np.arange(first), np.arange(first), np.arange(first, len(ds))]  # episode 0 twice
    ep = ds.episode[rows] + 1
    ep[:first] = 0
    cols = {c: getattr(ds, c)[rows] for c in ds.columns()}
    cols["episode"] = ep
    dup = dataclasses.replace(ds, **cols)
    d = M.duplicate_stats(dup)
    assert d["duplicate_episodes"] == 1
    assert d["duplicate_transitions"] == first
    assert M.duplicate_stats(ds)["duplicate_transitions"] == 0

    broken_obs = ds.obs.copy()
    broken_obs[5, 0] += 1.0  # next_obs[4] no longer equals obs[5]
    broken = dataclasses.replace(ds, obs=broken_obs)
    assert M.discontinuities(broken) == {"count": 1, "episodes": [int(ds.episode[5])]}
    assert M.discontinuities(ds)["count"] == 0

    bad = ds.obs.copy()
    bad[3, 2] = np.nan
    res = M.quality(dataclasses.replace(ds, obs=bad), None, NO_BC)
    assert res.numbers["nonfinite"]["obs"] == 1 and not res.ok
    assert "NaN" in res.problems[0]


def test_action_saturation_and_out_of_bounds_actions(hopper_random):
    a = M.action_stats(hopper_random)
    # uniform actions in [-1, 1]: P(|a| >= 0.99) = 0.01 per dimension
    assert all(0.0 < s < 0.03 for s in a["saturation"]) and a["out_of_bounds"] == 0
    act = hopper_random.action.copy()
    act[:10, 1] = 1.5
    res = M.quality(dataclasses.replace(hopper_random, action=act), None, NO_BC)
    assert res.numbers["actions"]["out_of_bounds"] == 10 and not res.ok


def test_behaviour_models_see_a_deterministic_policy_as_narrower_than_random_actions(hopper_random, hopper_linear):
    cfg = M.QualityConfig(bc_max_steps=300)
    rnd, _ = M.behaviour_fit(hopper_random, cfg)
    lin, arrays = M.behaviour_fit(hopper_linear, cfg)
    assert rnd["fitted"] and lin["fitted"]
    assert lin["entropy_proxy"] < rnd["entropy_proxy"] - 2.0
    assert rnd["residual_action_std"] == pytest.approx(1 / np.sqrt(3), abs=0.08)  # std of U(-1, 1)
    assert lin["residual_action_std"] < 0.2
    assert 1.0 <= rnd["effective_components"] <= 5.0
    assert len(arrays["bc_entropy"]) == lin["heldout_rows"]


def test_quality_metrics_are_flat_finite_floats(hopper_random, hopper_random_ref):
    without = M.quality_metrics(hopper_random, coverage=False)
    assert "quality/tq" in without and "quality/saco" not in without
    # no reference given and an empty store: the pooled reference of the dataset alone
    assert M.quality_metrics(hopper_random)["quality/saco_h_pd"] == 1.0
    with_ref = M.quality_metrics(hopper_random, hopper_random_ref, cfg=NO_BC)
    for key in ("quality/tq", "quality/saco", "quality/saco_grid", "quality/saco_h_pd", "quality/coverage",
                "quality/saco_paper/saturated", "quality/coverage/out_of_support", "quality/episodes/n_episodes"):
        assert key in with_ref, key
    assert all(isinstance(v, float) and np.isfinite(v) for v in with_ref.values())
    assert with_ref["quality/tq"] == without["quality/tq"]


def test_quality_metrics_are_kept_on_disk_and_computed_again_for_other_data_reference_or_settings(
        hopper_random, hopper_random_ref, monkeypatch):
    """Every fit logs them, and on 1M rows they take half a minute: the same data, reference and settings read
    them back; anything that changes the numbers computes them again."""
    first = M.quality_metrics(hopper_random, hopper_random_ref, cfg=NO_BC)
    calls = []
    real = M.quality
    monkeypatch.setattr(M, "quality", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert M.quality_metrics(hopper_random, hopper_random_ref, cfg=NO_BC) == first and calls == []
    doubled = dataclasses.replace(hopper_random, reward=hopper_random.reward * 2)
    other_rows = M.quality_metrics(doubled, hopper_random_ref, cfg=NO_BC)
    assert calls == [1] and other_rows["quality/returns/mean"] == pytest.approx(2 * first["quality/returns/mean"])
    M.quality_metrics(hopper_random, cfg=NO_BC)  # the default reference (the pooled one)
    M.quality_metrics(hopper_random, hopper_random_ref, cfg=M.QualityConfig(bc=False, coverage_k=3))
    assert calls == [1, 1, 1]


def test_a_reference_from_another_env_or_with_other_dimensions_is_refused(hopper_random):
    cheetah = make_sim_dataset("HalfCheetah-v5", steps=50, seed=0, name="cheetah-few")
    with pytest.raises(EnvError, match="HalfCheetah-v5") as e:
        M.quality(hopper_random, cheetah, NO_BC)
    assert "\n" not in str(e.value)
    wider = M.Reference("hopper-wide", "dataset", "Hopper-v5", 12, 3, np.zeros((10, 15), np.float32))
    with pytest.raises(EnvError, match="widths"):
        M.quality(hopper_random, wider, NO_BC)


def test_an_empty_dataset_is_refused_with_one_line():
    card = DatasetCard(name="empty", env_id="Hopper-v5", obs_dim=11, action_dim=3)
    z = np.zeros((0, 11), np.float32)
    empty = Dataset(card, np.zeros(0, np.int64), np.zeros(0, np.int32), z, z, np.zeros((0, 3), np.float32),
                    np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, bool))
    with pytest.raises(OfflabError, match="no transitions") as e:
        M.quality(empty, None, NO_BC)
    assert isinstance(e.value, DataValidationError) and "\n" not in str(e.value)


def test_pooled_reference_takes_equal_rows_from_each_member(hopper_random, hopper_linear):
    short = make_sim_dataset("Hopper-v5", steps=300, seed=2, name="hopper-short")
    ref = M.pooled_reference([hopper_random, hopper_linear, short], rows=900)
    assert ref.kind == "pooled" and ref.constituents == ("hopper-linear", "hopper-short", "hopper-tiny")
    assert len(ref) == 3 * 300


def test_reference_side_statistics_are_reused_from_disk_bit_for_bit(hopper_random, hopper_random_ref, monkeypatch):
    """A second report against the same reference (a new Reference object, another process in real use) reads
    the reference's entropies and radii back from OFFLAB_HOME instead of recomputing them, with the same numbers."""
    first = M.quality(hopper_random_ref, M.reference_from_dataset(hopper_random), NO_BC).numbers
    assert first["space"]["reference_cache"] == "computed and stored"
    calls = []
    real = M.kl_entropy
    monkeypatch.setattr(M, "kl_entropy", lambda z, k=5: calls.append(len(z)) or real(z, k))
    second = M.quality(hopper_random_ref, M.reference_from_dataset(hopper_random), NO_BC).numbers
    assert second["space"]["reference_cache"] == "reused from disk"
    assert len(calls) == len(NO_BC.seeds)  # the dataset's entropies only
    for section in ("saco_h", "coverage"):
        assert {k: v for k, v in second[section].items()} == {k: v for k, v in first[section].items()}
    off = M.quality(hopper_random_ref, M.reference_from_dataset(hopper_random),
                    dataclasses.replace(NO_BC, reference_cache=False)).numbers
    assert off["space"]["reference_cache"] == "off" and off["saco_h"] == first["saco_h"]


def test_a_reference_cache_that_cannot_be_written_does_not_fail_the_report(hopper_random, hopper_random_ref,
                                                                          tmp_path, monkeypatch):
    blocked = tmp_path / "home"
    blocked.write_text("a file where OFFLAB_HOME's folder would be")  # mkdir under it raises OSError
    monkeypatch.setenv("OFFLAB_HOME", str(blocked))
    n = M.quality(hopper_random_ref, M.reference_from_dataset(hopper_random), NO_BC).numbers
    off = M.quality(hopper_random_ref, M.reference_from_dataset(hopper_random),
                    dataclasses.replace(NO_BC, reference_cache=False)).numbers
    assert n["saco_h"] == off["saco_h"] and n["coverage"] == off["coverage"]
