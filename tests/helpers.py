"""Small helpers the test modules share."""
import jax
import numpy as np


def relative_distance(tree, reference) -> float:
  """||tree - reference|| / ||reference|| over all leaves, in float64.

  One number per state part: a few near-degenerate BN channels amplify float32 rounding in their
  own leaves, while a wrong reduction (a missed or doubled device) moves the whole part by O(1).
  """
  pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
           for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference))]
  return (np.sqrt(sum(np.sum((a - b) ** 2) for a, b in pairs)) /
          np.sqrt(sum(np.sum(b ** 2) for _, b in pairs)))


def set_fields(config, **overrides):
  """config with `a__b=value` meaning config.a.b = value."""
  for dotted, value in overrides.items():
    *parents, name = dotted.split("__")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config
