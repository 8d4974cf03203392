"""The trajectory table: dtypes, validation (each broken invariant named with its episode and step), hash, card."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from offlab.data.schema import (
    Dataset,
    DatasetCard,
    coerce_columns,
    episodes_from_ends,
    finalize,
    validate,
)
from offlab.errors import DataValidationError


def chain_dataset(lengths=(3, 4, 2), obs_dim=2, act_dim=1, terminal=(True, False, False), seed=0) -> Dataset:
    """Episodes whose next_obs[t] == obs[t+1]; episode i ends terminated if terminal[i], else truncated."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("episode", "step", "obs", "next_obs", "action", "reward", "terminated", "truncated")}
    for i, n in enumerate(lengths):
        chain = rng.standard_normal((n + 1, obs_dim))
        cols["episode"].append(np.full(n, i))
        cols["step"].append(np.arange(n))
        cols["obs"].append(chain[:-1])
        cols["next_obs"].append(chain[1:])
        cols["action"].append(rng.uniform(-1, 1, (n, act_dim)))
        cols["reward"].append(rng.standard_normal(n))
        end = np.zeros(n, bool)
        end[-1] = True
        cols["terminated"].append(end & terminal[i])
        cols["truncated"].append(end & (not terminal[i]))
    card = DatasetCard(name="chain", env_id="Test-v0", obs_dim=obs_dim, action_dim=act_dim)
    return coerce_columns(card, **{k: np.concatenate(v) for k, v in cols.items()})


def replace(ds: Dataset, **cols) -> Dataset:
    return dataclasses.replace(ds, **cols)


def test_coerce_gives_the_schema_dtypes():
    ds = chain_dataset()
    assert ds.episode.dtype == np.int64 and ds.step.dtype == np.int32
    assert ds.obs.dtype == ds.next_obs.dtype == ds.action.dtype == ds.reward.dtype == np.float32
    assert ds.terminated.dtype == ds.truncated.dtype == bool
    assert ds.obs.shape == (9, 2) and ds.action.shape == (9, 1) and ds.reward.shape == (9,)


def test_discrete_actions_stay_integer_vectors():
    ds = chain_dataset()
    ds = coerce_columns(ds.card, **{c: getattr(ds, c) for c in ds.columns() if c != "action"},
                        action=np.arange(len(ds)) % 3)
    assert ds.action.dtype == np.int64 and ds.action.shape == (len(ds),)
    validate(ds)


def test_sound_table_validates_and_finalize_fills_the_card():
    ds = finalize(chain_dataset())
    assert ds.card.n_episodes == 3 and ds.card.n_steps == 9
    assert ds.card.obs_dim == 2 and ds.card.action_dim == 1
    assert len(ds.card.content_hash) == 32 and ds.card.offlab_version


def test_episode_helpers():
    ds = chain_dataset(lengths=(3, 4, 2))
    assert ds.n_episodes == 3
    np.testing.assert_array_equal(ds.episode_starts, [0, 3, 7])
    np.testing.assert_array_equal(ds.episode_lengths, [3, 4, 2])
    np.testing.assert_allclose(ds.episode_returns(), [ds.reward[:3].sum(), ds.reward[3:7].sum(), ds.reward[7:].sum()],
                               rtol=1e-6)
    sub = ds.select_rows(np.arange(3, 9))
    np.testing.assert_array_equal(sub.episode, [0, 0, 0, 0, 1, 1])
    validate(sub)


def test_episodes_from_ends():
    episode, step = episodes_from_ends(np.array([False, True, False, False, True, False]))
    np.testing.assert_array_equal(episode, [0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(step, [0, 1, 0, 1, 2, 0])


@pytest.mark.parametrize("column", ["obs", "next_obs", "action", "reward"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_is_named_with_column_episode_and_step(column, bad):
    ds = chain_dataset()
    a = getattr(ds, column).copy()
    a.reshape(len(ds), -1)[4, 0] = bad  # row 4 = episode 1, step 1
    with pytest.raises(DataValidationError, match=rf"column '{column}' has NaN or inf at episode 1, step 1"):
        validate(replace(ds, **{column: a}))


def test_episodes_not_contiguous():
    ds = chain_dataset()
    episode = ds.episode.copy()
    episode[3:7], episode[7:] = 2, 1  # 0 0 0 2 2 2 2 1 1
    with pytest.raises(DataValidationError, match="not contiguous"):
        validate(replace(ds, episode=episode))
    with pytest.raises(DataValidationError, match="must start at 0"):
        validate(replace(ds, episode=ds.episode + 1))


def test_steps_out_of_order_names_episode_and_row():
    ds = chain_dataset()
    step = ds.step.copy()
    step[4], step[5] = 2, 1
    with pytest.raises(DataValidationError, match=r"steps out of order in episode 1 \(row 4 has step 2, expected 1\)"):
        validate(replace(ds, step=step))


def test_next_obs_mismatch_reports_first_episode_and_step():
    ds = chain_dataset()
    next_obs = ds.next_obs.copy()
    next_obs[5, 1] += 0.5  # episode 1, step 2
    next_obs[1, 0] += 0.5  # episode 0, step 1: the first one
    with pytest.raises(DataValidationError, match=r"next_obs\[t\] != obs\[t\+1\] in episode 0 at step 1"):
        validate(replace(ds, next_obs=next_obs))


def test_next_obs_within_float_tolerance_passes_and_episode_ends_are_not_compared():
    ds = chain_dataset()
    next_obs = ds.next_obs.copy()
    next_obs[0] = np.nextafter(next_obs[0], np.float32(np.inf))  # one ulp off inside an episode: fine
    next_obs[2] += 10.0  # last step of episode 0: its next_obs is not the next episode's first obs
    validate(replace(ds, next_obs=next_obs))


def test_terminal_in_the_middle_of_an_episode():
    ds = chain_dataset()
    terminated = ds.terminated.copy()
    terminated[4] = True
    with pytest.raises(DataValidationError, match="episode 1 is terminated or truncated at step 1 but continues"):
        validate(replace(ds, terminated=terminated))


def test_terminated_and_truncated_stay_apart():
    ds = finalize(chain_dataset(terminal=(True, False, True)))
    np.testing.assert_array_equal(np.flatnonzero(ds.terminated), [2, 8])
    np.testing.assert_array_equal(np.flatnonzero(ds.truncated), [6])


def test_wrong_lengths_and_shapes():
    ds = chain_dataset()
    with pytest.raises(DataValidationError, match="column 'action' has 8 rows, expected 9"):
        validate(replace(ds, action=ds.action[:-1]))
    with pytest.raises(DataValidationError, match="must both be"):
        validate(replace(ds, next_obs=ds.next_obs[:, :1]))
    with pytest.raises(DataValidationError, match="no transitions"):
        validate(ds.select_rows(np.zeros(0, dtype=np.int64)))


def test_content_hash_depends_on_values_only():
    a, b = chain_dataset(), chain_dataset()
    assert a.content_hash() == b.with_card(name="other", notes="x").content_hash()
    reward = b.reward.copy()
    reward[0] += 1e-3
    assert replace(b, reward=reward).content_hash() != a.content_hash()


def test_card_json_round_trip_and_bad_json():
    card = DatasetCard(name="x", env_id="Hopper-v5", obs_dim=11, action_dim=3, env_kwargs={"max_episode_steps": 50},
                       ref_min_score=-20.272305, ref_max_score=3234.3, source={"kind": "minari", "minari_id": "a/b-v0"})
    assert DatasetCard.from_json(card.to_json()) == card
    with pytest.raises(DataValidationError, match="not valid JSON"):
        DatasetCard.from_json('{"name": "x", ')
    with pytest.raises(DataValidationError, match="lacks the fields"):
        DatasetCard.from_json('{"name": "x"}')


def test_repr_shows_shapes_not_values():
    text = repr(chain_dataset())
    assert "obs=float32[9, 2]" in text and "episodes=3" in text
