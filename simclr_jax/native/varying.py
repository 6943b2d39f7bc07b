"""Operands of the kernels inside `shard_map`: made to vary over the same mesh axes."""
import jax


def vary_alike(*values):
  """`values` cast to vary over the same mesh axes, as JAX does before any primitive inside
  `shard_map`; for custom calls and custom_vjp functions that take a replicated parameter with
  a sharded map. The cast's transpose sums the parameter's gradient over the data axis, so the
  function itself sees one device's shard like any other primitive."""
  varying = [jax.typeof(v).manual_axis_type.varying for v in values]
  axes = frozenset().union(*varying)
  missing = [tuple(sorted(axes - own)) for own in varying]
  return tuple(jax.lax.pcast(v, axes_to_add, to="varying") if axes_to_add else v
               for v, axes_to_add in zip(values, missing))
