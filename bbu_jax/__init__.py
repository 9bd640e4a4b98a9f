"""bbu_jax: Qwen2.5-VL fine-tuning, batched inference and evaluation for telecom-cabinet photos, in JAX."""

from flax import nnx as _nnx

# Parameters carry logical axis names (`out_sharding` metadata) that bbu_jax.parallel.sharding maps to
# mesh axes; state is placed by `jax.jit(..., out_shardings=...)`, never eagerly at construction, so
# a model can be built abstractly (`nnx.eval_shape`) with no mesh in scope.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
