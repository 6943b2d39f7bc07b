"""Entry points of the evaluation modes, as `simclr_jax.main` dispatches them.

`linear_probe(config, workdir)` and `finetune(config, workdir)` live in `simclr_jax.evaluators`;
k-NN is `simclr_jax.knn`, feature extraction `simclr_jax.features`.
"""
from simclr_jax.evaluators.finetune import finetune
from simclr_jax.evaluators.linear_probe import linear_probe

__all__ = ["finetune", "linear_probe"]
