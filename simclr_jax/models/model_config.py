"""`config.model`, the one list of model fields: what encoder exports store and models are built
from. A new field is added here and where the module that uses it is built (`build_encoder`,
`build_projection_head`); recipes set it as data."""
import dataclasses
from typing import Any, Mapping

from simclr_jax.models.heads import ProjectionHead, validate_head_args
from simclr_jax.models.resnet import ResNet, resnet_output_dim, validate_resnet_args

# Fields that only matter while training: an export and the run that loads it may differ there.
TRAINING_ONLY_FIELDS = ("bn_momentum",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture of a SimCLR model (ResNet encoder + projection head)."""
  depth: int
  width_multiplier: float
  cifar_stem: bool = False         # 3x3 stride-1 stem without max-pool, for 32 px images
  sk_ratio: float = 0.0            # selective kernels (SimCLRv2 uses 0.0625); 0 = none
  tf_same_padding: bool = False    # TF 'SAME' max-pool padding, as converted TF1 checkpoints
  head_layers: int = 2             # projection head depth: 2 = SimCLR v1, 3 = v2
  head_hidden_dim: int = 0         # 0 = width of h
  projection_dim: int = 128
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  def __post_init__(self):
    for name in ("cifar_stem", "tf_same_padding"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"model config {name} must be True or False, got "
                         f"{getattr(self, name)!r}")
    validate_resnet_args(self.depth, self.width_multiplier, self.sk_ratio, self.bn_momentum,
                         self.bn_epsilon)
    validate_head_args(self.head_layers, self.head_hidden_dim, self.projection_dim)

  @classmethod
  def from_mapping(cls, model_config: Mapping[str, Any]) -> "ModelConfig":
    """From `config.model` (a ConfigDict or dict); unknown or missing fields are errors."""
    if isinstance(model_config, ModelConfig):
      return model_config
    given = {key: model_config[key] for key in model_config.keys()}
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
      raise ValueError(f"unknown model config fields {unknown}; allowed: {sorted(fields)}")
    required = [name for name, field in fields.items()
                if field.default is dataclasses.MISSING]
    missing = [name for name in required if name not in given]
    if missing:
      raise ValueError(f"model config lacks {missing} (required: {required})")
    return cls(**given)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def architecture(self) -> dict[str, Any]:
    """The fields that decide the network's function (all but the training-only ones)."""
    return {name: value for name, value in self.to_dict().items()
            if name not in TRAINING_ONLY_FIELDS}

  def representation_dim(self) -> int:
    """Width of the representation h."""
    return resnet_output_dim(self.depth, self.width_multiplier)


def build_encoder(config: ModelConfig, *, axis_name: str | None, dtype: Any, conv_backend: str,
                  norm_backend: str, **module_kwargs) -> ResNet:
  """The ResNet of `config`; `module_kwargs` (e.g. name=) go to the Flax module."""
  return ResNet(config.depth, width_multiplier=config.width_multiplier,
                cifar_stem=config.cifar_stem, sk_ratio=config.sk_ratio,
                tf_same_padding=config.tf_same_padding, bn_momentum=config.bn_momentum,
                bn_epsilon=config.bn_epsilon, axis_name=axis_name, dtype=dtype,
                conv_backend=conv_backend, norm_backend=norm_backend, **module_kwargs)


def build_projection_head(config: ModelConfig, *, axis_name: str | None, dtype: Any,
                          **module_kwargs) -> ProjectionHead:
  return ProjectionHead(config.head_layers, config.head_hidden_dim, config.projection_dim,
                        bn_momentum=config.bn_momentum, bn_epsilon=config.bn_epsilon,
                        axis_name=axis_name, dtype=dtype, **module_kwargs)
