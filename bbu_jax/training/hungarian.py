"""Exact minimum-cost bipartite matching (linear sum assignment) computed inside jit.

The detection loss matches queries to ground-truth objects on device: no host callback, so the same
train step runs on TPU pods. The solver is the shortest augmenting path algorithm with dual potentials
(Jonker-Volgenant / Crouse 2016, the one scipy.optimize.linear_sum_assignment uses), O(n^3), written
with lax loops on static shapes; vmap it over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def linear_sum_assignment(cost: Array, valid_rows: Array | None = None,
                          valid_cols: Array | None = None) -> Array:
  """Minimum-cost assignment of rows to columns; returns `col_for_row` (N,) int32, -1 = unmatched.

  cost: (N, M), any N and M. valid_rows (N,) / valid_cols (M,) bool mark the real rows and columns
  (default all): the problem is solved on the valid sub-matrix only, so padded entries are never read
  into the result and never matched, whatever they hold. Like scipy, min(#valid rows, #valid cols)
  pairs are matched with the least total cost. Non-finite entries (inf, -inf, NaN) are forbidden
  pairs; a row that no feasible matching can serve stays -1 (scipy raises instead). Computes in the
  cost's float dtype (integers in float32), so float32 totals equal scipy's to float32 rounding.
  """
  if cost.ndim != 2:
    raise ValueError(f"linear_sum_assignment: cost must be (rows, cols), got shape {cost.shape}")
  n, m = cost.shape
  k = max(n, m)
  dtype = jnp.promote_types(cost.dtype, jnp.float32)
  rows_ok = _validity(valid_rows, n, "valid_rows")
  cols_ok = _validity(valid_cols, m, "valid_cols")
  if n == 0 or m == 0:
    return jnp.full((n,), -1, jnp.int32)

  # Square (k, k) problem: the padding rows/columns are simply invalid, so one code path serves
  # rectangular costs in both orientations.
  square = jnp.zeros((k, k), dtype).at[:n, :m].set(cost.astype(dtype))
  rows_ok = jnp.zeros((k,), bool).at[:n].set(rows_ok)
  cols_ok = jnp.zeros((k,), bool).at[:m].set(cols_ok)
  allowed = rows_ok[:, None] & cols_ok[None, :] & jnp.isfinite(square)
  square = jnp.where(allowed, square, 0)

  # Augmenting from every row needs at least as many columns: solve the transpose when the valid
  # rows outnumber the valid columns (a data-dependent choice, hence a select, not Python).
  transpose = rows_ok.sum() > cols_ok.sum()
  oriented_cost = jnp.where(transpose, square.T, square)
  oriented_allowed = jnp.where(transpose, allowed.T, allowed)
  oriented_rows_ok = jnp.where(transpose, cols_ok, rows_ok)

  col4row, row4col = _solve(oriented_cost, oriented_allowed, oriented_rows_ok)
  col_for_row = jnp.where(transpose, row4col, col4row)[:n]
  return col_for_row.astype(jnp.int32)


def _validity(valid: Array | None, size: int, name: str) -> Array:
  if valid is None:
    return jnp.ones((size,), bool)
  if valid.shape != (size,):
    raise ValueError(f"linear_sum_assignment: {name} must have shape ({size},), got {valid.shape}")
  return valid.astype(bool)


def _solve(cost: Array, allowed: Array, rows_ok: Array) -> tuple[Array, Array]:
  """Successive shortest augmenting paths on a square cost, augmenting once per valid row.

  Invariant: reduced costs cost[i, j] - u[i] - v[j] are >= 0 on allowed pairs and 0 on matched ones,
  so each Dijkstra search finds a cheapest augmenting path and the final matching is optimal.
  """
  k = cost.shape[0]
  dtype = cost.dtype
  inf = jnp.array(jnp.inf, dtype)

  def augment_row(r, state):
    u, v, col4row, row4col = state

    def search_cond(s):
      _, _, _, _, _, _, sink, failed = s
      return (sink < 0) & ~failed

    def search_step(s):
      dist, pred, scanned_rows, scanned_cols, i, min_val, _, _ = s
      scanned_rows = scanned_rows.at[i].set(True)
      reduced = min_val + cost[i] - u[i] - v
      reduced = jnp.where(allowed[i] & ~scanned_cols, reduced, inf)
      better = reduced < dist
      dist = jnp.where(better, reduced, dist)
      pred = jnp.where(better, i, pred)
      candidates = jnp.where(scanned_cols, inf, dist)
      lowest = candidates.min()
      # Among equally short paths prefer one ending at a free column: it ends the search sooner.
      tie_rank = jnp.where(candidates == lowest, jnp.where(row4col < 0, 0, 1), 2)
      j = jnp.argmin(tie_rank)
      failed = lowest == inf
      scanned_cols = scanned_cols.at[j].set(scanned_cols[j] | ~failed)
      sink = jnp.where(~failed & (row4col[j] < 0), j, -1)
      return (dist, pred, scanned_rows, scanned_cols, row4col[j], jnp.where(failed, min_val, lowest),
              sink, failed)

    start = (jnp.full((k,), inf), jnp.full((k,), -1, jnp.int32), jnp.zeros((k,), bool),
             jnp.zeros((k,), bool), r, jnp.zeros((), dtype), jnp.array(-1, jnp.int32), ~rows_ok[r])
    dist, pred, scanned_rows, scanned_cols, _, min_val, sink, failed = jax.lax.while_loop(
        search_cond, search_step, start)

    # Dual update keeps reduced costs non-negative and makes the new path tight.
    matched_dist = dist[jnp.maximum(col4row, 0)]
    new_u = jnp.where(scanned_rows, u + min_val - matched_dist, u)
    new_u = new_u.at[r].set(u[r] + min_val)
    new_v = jnp.where(scanned_cols, v - (min_val - dist), v)

    def flip_cond(s):
      return ~s[3]

    def flip_step(s):
      col4row, row4col, j, _ = s
      i = pred[j]
      next_j = col4row[i]
      return col4row.at[i].set(j), row4col.at[j].set(i), next_j, i == r

    new_col4row, new_row4col, _, _ = jax.lax.while_loop(
        flip_cond, flip_step, (col4row, row4col, jnp.maximum(sink, 0), sink < 0))
    # A row with no feasible path (forbidden pairs) or an invalid row leaves everything as it was.
    found = ~failed & (sink >= 0)
    keep = lambda new, old: jnp.where(found, new, old)
    return keep(new_u, u), keep(new_v, v), keep(new_col4row, col4row), keep(new_row4col, row4col)

  state = (jnp.zeros((k,), dtype), jnp.zeros((k,), dtype), jnp.full((k,), -1, jnp.int32),
           jnp.full((k,), -1, jnp.int32))
  _, _, col4row, row4col = jax.lax.fori_loop(0, k, augment_row, state)
  return col4row, row4col


def assignment_pairs(col_for_row) -> tuple[np.ndarray, np.ndarray]:
  """Host-side (row_ind, col_ind) of a `col_for_row` vector, in scipy's layout (rows ascending)."""
  col_for_row = np.asarray(col_for_row)
  rows = np.nonzero(col_for_row >= 0)[0]
  return rows, col_for_row[rows]


def row_for_col(col_for_row: Array, num_cols: int) -> Array:
  """Inverse of an assignment: (num_cols,) int32 row index per column, -1 where unmatched."""
  rows = jnp.arange(col_for_row.shape[0], dtype=jnp.int32)
  matched = col_for_row >= 0
  # Unmatched rows scatter -1 onto column 0; max keeps a real row there if one exists.
  return jnp.full((num_cols,), -1, jnp.int32).at[jnp.maximum(col_for_row, 0)].max(
      jnp.where(matched, rows, -1))
