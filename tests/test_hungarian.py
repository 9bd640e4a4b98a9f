"""The in-graph Hungarian matcher against scipy.optimize.linear_sum_assignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from bbu_jax.training.hungarian import assignment_pairs, linear_sum_assignment, row_for_col

batched_lsa = jax.jit(jax.vmap(linear_sum_assignment))


def _assert_valid_matching(col_for_row, n_rows, n_cols, valid_rows=None, valid_cols=None):
  valid_rows = np.ones(n_rows, bool) if valid_rows is None else np.asarray(valid_rows)
  valid_cols = np.ones(n_cols, bool) if valid_cols is None else np.asarray(valid_cols)
  col_for_row = np.asarray(col_for_row)
  assert col_for_row.shape == (n_rows,)
  rows, cols = assignment_pairs(col_for_row)
  assert len(set(cols.tolist())) == len(cols), f"a column is matched twice: {col_for_row}"
  assert np.all((cols >= 0) & (cols < n_cols))
  assert valid_rows[rows].all() and valid_cols[cols].all(), "a padded row or column was matched"
  assert len(rows) == min(valid_rows.sum(), valid_cols.sum())
  return rows, cols


def _scipy_optimum(cost, valid_rows, valid_cols):
  sub = cost[np.asarray(valid_rows)][:, np.asarray(valid_cols)]
  r, c = scipy_lsa(sub)
  return sub[r, c].sum(dtype=np.float64)


def _random_costs(rng, kind, shape):
  if kind == "uniform":
    return rng.random(shape).astype(np.float32)
  if kind == "ties":  # few distinct values: many optimal matchings
    return rng.integers(0, 3, shape).astype(np.float32)
  if kind == "integer":
    return rng.integers(-1000, 1000, shape).astype(np.int32)
  if kind == "wide_range":  # DETR-like mixes of tiny and large costs
    return (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)).astype(np.float32)
  raise ValueError(kind)


@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (4, 9), (1, 5), (5, 1)])
def test_total_cost_equals_scipy_optimum(shape):
  rng = np.random.default_rng(list(shape))
  batch = 24
  ones_r, ones_c = np.ones((batch, shape[0]), bool), np.ones((batch, shape[1]), bool)
  for kind in ("uniform", "ties", "integer", "wide_range"):
    costs = _random_costs(rng, kind, (batch, *shape))
    result = np.asarray(batched_lsa(jnp.asarray(costs), ones_r, ones_c))
    for cost, col_for_row in zip(costs, result):
      rows, cols = _assert_valid_matching(col_for_row, *shape)
      ours = cost[rows, cols].sum(dtype=np.float64)
      best = _scipy_optimum(cost, ones_r[0], ones_c[0])
      if kind in ("ties", "integer"):
        assert ours == best, kind
      else:
        np.testing.assert_allclose(ours, best, rtol=1e-5, atol=1e-6 * np.abs(cost).max(), err_msg=kind)


def test_padded_rows_and_columns_are_never_matched_and_never_matter():
  rng = np.random.default_rng(1)
  batch, n, m = 64, 8, 6
  costs = rng.random((batch, n, m)).astype(np.float32)
  valid_rows = rng.random((batch, n)) < 0.7
  valid_cols = rng.random((batch, m)) < 0.6
  valid_rows[0], valid_cols[1] = False, False  # nothing valid on one side
  result = np.asarray(batched_lsa(jnp.asarray(costs), jnp.asarray(valid_rows), jnp.asarray(valid_cols)))
  for cost, vr, vc, col_for_row in zip(costs, valid_rows, valid_cols, result):
    rows, cols = _assert_valid_matching(col_for_row, n, m, vr, vc)
    if len(rows):
      np.testing.assert_allclose(cost[rows, cols].sum(), _scipy_optimum(cost, vr, vc), rtol=1e-5)
  assert (result[0] == -1).all() and (result[1] == -1).all()

  # Whatever the padded entries hold (NaN, inf, huge negatives), the result is the same.
  padded = ~(valid_rows[:, :, None] & valid_cols[:, None, :])
  for garbage in (np.nan, np.inf, -1e9, 0.0):
    changed = np.where(padded, np.float32(garbage), costs)
    again = batched_lsa(jnp.asarray(changed), jnp.asarray(valid_rows), jnp.asarray(valid_cols))
    np.testing.assert_array_equal(np.asarray(again), result)


def test_square_padding_of_targets_like_the_detection_loss():
  # 10 queries, up to 4 targets of which the first k are real.
  rng = np.random.default_rng(2)
  costs = rng.random((5, 10, 4)).astype(np.float32)
  valid_cols = np.arange(4)[None, :] < np.array([0, 1, 2, 3, 4])[:, None]
  result = np.asarray(batched_lsa(jnp.asarray(costs), jnp.ones((5, 10), bool), jnp.asarray(valid_cols)))
  for k, (cost, col_for_row) in enumerate(zip(costs, result)):
    rows, cols = _assert_valid_matching(col_for_row, 10, 4, None, valid_cols[k])
    assert sorted(cols.tolist()) == list(range(k))
    real = cost[:, :k]
    r, c = scipy_lsa(real)
    np.testing.assert_allclose(cost[rows, cols].sum(), real[r, c].sum(), rtol=1e-5)


def test_forbidden_pairs():
  rng = np.random.default_rng(3)
  costs = rng.random((40, 6, 5)).astype(np.float32)
  costs[rng.random((40, 6, 5)) < 0.4] = np.inf
  # Last sample: a row with no allowed column stays unmatched; the others are matched optimally.
  costs[-1, 2, :] = np.inf
  costs[-1, [0, 1, 3, 4, 5], :] = rng.random((5, 5))
  result = np.asarray(batched_lsa(jnp.asarray(costs), jnp.ones((40, 6), bool), jnp.ones((40, 5), bool)))
  checked = 0
  for cost, col_for_row in zip(costs[:-1], result[:-1]):
    try:
      r, c = scipy_lsa(cost)
    except ValueError:  # infeasible: scipy refuses
      continue
    rows, cols = _assert_valid_matching(col_for_row, 6, 5)
    np.testing.assert_allclose(cost[rows, cols].sum(), cost[r, c].sum(), rtol=1e-5)
    checked += 1
  assert checked >= 10

  assert result[-1, 2] == -1
  rest = np.array([0, 1, 3, 4, 5])
  rows, cols = _assert_valid_matching(result[-1][rest], 5, 5)
  r, c = scipy_lsa(costs[-1][rest])
  np.testing.assert_allclose(costs[-1][rest][rows, cols].sum(), costs[-1][rest][r, c].sum(), rtol=1e-6)


def test_row_for_col_inverts_the_assignment():
  col_for_row = jnp.array([2, -1, 0, -1, 4], jnp.int32)
  np.testing.assert_array_equal(np.asarray(row_for_col(col_for_row, 6)), [2, -1, 0, -1, 4, -1])


def test_compiles_once_per_shape():
  traces = []

  def traced(cost, valid_cols):
    traces.append(cost.shape)
    return jax.vmap(lambda c, v: linear_sum_assignment(c, valid_cols=v))(cost, valid_cols)

  solve = jax.jit(traced)
  rng = np.random.default_rng(4)
  for _ in range(5):
    cost = rng.random((3, 7, 5)).astype(np.float32)
    valid = rng.random((3, 5)) < 0.5  # data-dependent orientation must not retrace
    solve(jnp.asarray(cost), jnp.asarray(valid)).block_until_ready()
  assert traces == [(3, 7, 5)]


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match="valid_cols must have shape"):
    linear_sum_assignment(jnp.zeros((3, 4)), valid_cols=jnp.ones((3,), bool))
  with pytest.raises(ValueError, match="cost must be"):
    linear_sum_assignment(jnp.zeros((3, 4, 5)))
