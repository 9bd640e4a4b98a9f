"""Shared test setup: CPU only, float32 matmuls at full precision, paths to optional real data."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """../shared/data with the real annotation records; tests that need it skip when it is absent."""
  if not (SHARED_DATA / "bbu_records.jsonl").exists():
    pytest.skip(f"real annotation records not present at {SHARED_DATA}")
  return SHARED_DATA
