"""The jobs `config.mode` selects: each is `run(config, workdir, *, mesh=None) -> results`.

- pretrain: SimCLR on two views per image (jobs/pretrain.py);
- linear_probe: a linear head on a frozen encoder export, SGD or L-BFGS (jobs/linear_probe.py);
- finetune: the whole network (or above a block) with labels, or a supervised baseline from
  random init (jobs/finetune.py).
All three train through `simclr_jax.loop` and score with `simclr_jax.evaluators`.
"""
from simclr_jax.jobs import finetune
from simclr_jax.jobs import linear_probe
from simclr_jax.jobs import pretrain

JOBS = {"pretrain": pretrain.run, "linear_probe": linear_probe.run, "finetune": finetune.run}
