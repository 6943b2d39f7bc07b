"""The config's backend options (conv_backend, norm_backend, augment_backend): each chooses
between a portable implementation and the native kernels, which run on the CPU backend only."""
import dataclasses
import logging

import jax

from simclr_jax.native import augment, batch_norm, build, conv


@dataclasses.dataclass(frozen=True)
class _Option:
  choices: tuple[str, ...]  # 'auto', the portable one, the native ones
  native_default: str  # what 'auto' picks where the kernels run
  kernels: build.Kernels
  fallback: str  # what 'auto' runs on CPU without the kernels, for the log

  @property
  def portable(self) -> str:
    return self.choices[1]


OPTIONS = {
    "conv_backend": _Option(("auto", "xla", "onednn", "onednn_bf16"), "onednn", conv.KERNELS,
                            "XLA's slower CPU convolutions"),
    "norm_backend": _Option(("auto", "jax", "native"), "native", batch_norm.KERNELS,
                            "XLA's slower batch norm"),
    "augment_backend": _Option(("auto", "jax", "native"), "native", augment.KERNELS,
                               "the slower JAX augmentations on CPU"),
}


def _option(option: str) -> _Option:
  if option not in OPTIONS:
    raise ValueError(f"unknown backend option {option!r}; known: {', '.join(OPTIONS)}")
  return OPTIONS[option]


def resolve_backend(option: str, choice: str, platform: str | None = None) -> str:
  """The backend `choice` of config field `option`, resolved for `platform` (default: this
  run's JAX backend; e.g. 'tpu' when lowering for one from a CPU): 'auto' is the native default
  on the CPU platform when the kernels can run, else the portable one, logging why on CPU.
  Raises ValueError for an unknown choice or a native one that cannot run there."""
  spec = _option(option)
  if choice not in spec.choices:
    raise ValueError(f"{option}={choice!r}; allowed: {', '.join(spec.choices)}")
  if choice == spec.portable:
    return choice
  platform = platform or jax.default_backend()
  on_cpu = platform == "cpu"
  reason = (spec.kernels.unavailable_reason() if on_cpu else
            f"the kernels run on the CPU backend only; this run's is {platform!r}")
  if choice == "auto":
    if reason is not None and on_cpu:
      logging.warning("%s='auto' uses %s: %s", option, spec.fallback, reason)
    return spec.portable if reason is not None else spec.native_default
  if reason is not None:
    raise ValueError(f"{option}={choice!r} cannot run here: {reason}. Use 'auto' or "
                     f"'{spec.portable}'.")
  return choice


def backend_choices(option: str) -> tuple[str, ...]:
  """What config field `option` allows: 'auto', the portable backend, the native ones."""
  return _option(option).choices


def check_resolved(**backends: str) -> None:
  """Raises ValueError unless each `option=backend` names a resolved choice (not 'auto'), e.g.
  for a model's fields."""
  for option, backend in backends.items():
    resolved = _option(option).choices[1:]
    if backend not in resolved:
      quoted = [f"'{choice}'" for choice in resolved]
      raise ValueError(f"{option.replace('_', ' ')} {backend!r}: {', '.join(quoted[:-1])} or "
                       f"{quoted[-1]} (resolve 'auto' first)")
