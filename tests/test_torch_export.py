"""Safetensors export: torchvision names and layouts always; a PyTorch round trip if torch exists.

The numeric check builds a plain PyTorch ResNet (written below, torchvision's layout) from
model.json alone, loads the tensors with strict=True and compares its h with the JAX encoder's.
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from simclr_jax import export
from simclr_jax import models
from simclr_jax.interop import torch_export

TINY_R18 = dict(depth=18, width_multiplier=0.125, cifar_stem=True)


def model_config(**fields):
  config = dict(depth=18, width_multiplier=0.125, cifar_stem=False, sk_ratio=0.0,
                tf_same_padding=False, head_layers=2, head_hidden_dim=0, projection_dim=16,
                bn_momentum=0.9, bn_epsilon=1e-5)
  config.update(fields)
  return config


def random_variables(config, image_size=32, seed=0):
  """Every parameter and BN statistic random (zero-init gammas would hide mapping mistakes)."""
  model = models.create_model(config, num_classes=3)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, image_size, image_size, 3)),
                                             train=False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name == "scale":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    fan_in = math.prod(leaf.shape[:-1]) or 1
    return (rng.normal(size=leaf.shape) / math.sqrt(fan_in)).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  parts = ("encoder", "projection_head")
  return {collection: {part: variables[collection][part] for part in parts}
          for collection in ("params", "batch_stats")}


def write_export(tmp_path, config, variables, supervised_head=None):
  params = dict(variables["params"])
  if supervised_head is not None:
    params["supervised_head"] = supervised_head
  return export.save_encoder(str(tmp_path / "export"), model_config=config, params=params,
                             batch_stats=variables["batch_stats"])


def expected_names(layers, bottleneck, downsample_blocks):
  bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
  names = {"conv1.weight"} | {f"bn1.{n}" for n in bn}
  for group, count in enumerate(layers, start=1):
    for block in range(count):
      prefix = f"layer{group}.{block}"
      for i in (1, 2, 3) if bottleneck else (1, 2):
        names.add(f"{prefix}.conv{i}.weight")
        names |= {f"{prefix}.bn{i}.{n}" for n in bn}
      if (group, block) in downsample_blocks:
        names.add(f"{prefix}.downsample.0.weight")
        names |= {f"{prefix}.downsample.1.{n}" for n in bn}
  return names


@pytest.mark.parametrize("depth,layers,bottleneck,downsample_blocks", [
    (18, [2, 2, 2, 2], False, {(2, 0), (3, 0), (4, 0)}),
    (50, [3, 4, 6, 3], True, {(1, 0), (2, 0), (3, 0), (4, 0)}),
])
def test_names_and_layouts_follow_torchvision(depth, layers, bottleneck, downsample_blocks):
  config = model_config(depth=depth, width_multiplier=0.0625 if bottleneck else 0.125)
  variables = random_variables(config)
  tensors = torch_export.torch_state_dict(variables["params"], variables["batch_stats"])
  encoder_names = {name for name in tensors if not name.startswith("projection_head.")}
  assert encoder_names == expected_names(layers, bottleneck, downsample_blocks)

  encoder = variables["params"]["encoder"]
  np.testing.assert_array_equal(tensors["conv1.weight"],
                                np.transpose(encoder["stem_conv"]["kernel"], (3, 2, 0, 1)))
  assert tensors["conv1.weight"].shape == (encoder["stem_conv"]["kernel"].shape[3], 3, 7, 7)
  shortcut_stats = variables["batch_stats"]["encoder"]["block2_0"]["shortcut_bn"]
  np.testing.assert_array_equal(tensors["layer2.0.downsample.1.running_var"],
                                shortcut_stats["var"])
  np.testing.assert_array_equal(tensors["layer1.1.bn1.weight"],
                                encoder["block1_1"]["bn1"]["scale"])
  assert tensors["bn1.num_batches_tracked"].dtype == np.int64
  head = variables["params"]["projection_head"]
  np.testing.assert_array_equal(tensors["projection_head.dense_1.weight"],
                                head["dense_1"]["kernel"].T)
  # The last head BN has no beta in Flax; it is exported as zeros for a standard BatchNorm1d.
  np.testing.assert_array_equal(tensors["projection_head.bn_1.bias"], np.zeros(16, np.float32))

  description = torch_export.architecture(config, variables["params"])
  representation_dim = models.ModelConfig.from_mapping(config).representation_dim()
  assert description["layers"] == layers
  assert description["block"] == ("bottleneck" if bottleneck else "basic")
  assert description["representation_dim"] == representation_dim
  assert description["bn_momentum"] == pytest.approx(0.1)
  assert description["projection_head"]["dims"] == [representation_dim, 16]


def test_export_tool_writes_safetensors_and_json(tmp_path):
  config = model_config(**TINY_R18)
  variables = random_variables(config)
  supervised_head = {"dense": {"kernel": np.ones((64, 3), np.float32),
                               "bias": np.arange(3, dtype=np.float32)}}
  directory = write_export(tmp_path, config, variables, supervised_head)
  tensors_path, description_path = torch_export.export_safetensors(directory, str(tmp_path / "pt"))
  tensors = safetensors.numpy.load_file(tensors_path)
  assert tensors["fc.weight"].shape == (3, 64)
  np.testing.assert_array_equal(tensors["fc.bias"], [0, 1, 2])
  with open(description_path) as f:
    description = json.load(f)
  assert description["num_classes"] == 3 and description["cifar_stem"]
  assert description["stem_kernel_size"] == 3 and not description["stem_maxpool"]
  with safetensors.safe_open(tensors_path, "np") as f:
    assert json.loads(f.metadata()["architecture"]) == description


def test_selective_kernel_networks_are_refused(tmp_path):
  config = model_config(depth=50, width_multiplier=0.0625, sk_ratio=0.0625)
  variables = random_variables(config)
  with pytest.raises(ValueError, match="sk_ratio"):
    torch_export.architecture(config, variables["params"])


def test_missing_export_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not an encoder export"):
    torch_export.export_safetensors(str(tmp_path / "nothing"), str(tmp_path / "out"))


# ------------------------------------------------------------------------------------------------
# Numeric round trip through a plain PyTorch ResNet (only where torch is installed).


def build_torch_resnet(torch, description):
  """A torchvision-layout ResNet built from model.json only."""
  nn, functional = torch.nn, torch.nn.functional
  eps, momentum = description["bn_eps"], description["bn_momentum"]
  batch_norm = lambda channels: nn.BatchNorm2d(channels, eps=eps, momentum=momentum)

  class Block(nn.Module):
    def __init__(self, inplanes, planes, stride, bottleneck):
      super().__init__()
      out = planes * (4 if bottleneck else 1)
      if bottleneck:
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = batch_norm(out)
      else:
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn1, self.bn2 = batch_norm(planes), batch_norm(planes)
      self.bottleneck = bottleneck
      self.downsample = None
      if stride != 1 or inplanes != out:
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                        batch_norm(out))

    def forward(self, x):
      y = functional.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      if self.bottleneck:
        y = self.bn3(self.conv3(functional.relu(y)))
      return functional.relu(y + (x if self.downsample is None else self.downsample(x)))

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      kernel = description["stem_kernel_size"]
      self.conv1 = nn.Conv2d(3, description["stem_width"], kernel, description["stem_stride"],
                             (kernel - 1) // 2, bias=False)
      self.bn1 = batch_norm(description["stem_width"])
      bottleneck = description["block"] == "bottleneck"
      inplanes = description["stem_width"]
      for group, (count, width) in enumerate(zip(description["layers"], description["widths"])):
        blocks = []
        for index in range(count):
          blocks.append(Block(inplanes, width, 2 if group > 0 and index == 0 else 1, bottleneck))
          inplanes = width * description["expansion"]
        setattr(self, f"layer{group + 1}", nn.Sequential(*blocks))

    def forward(self, x):
      x = functional.relu(self.bn1(self.conv1(x)))
      if description["stem_maxpool"]:
        if description["maxpool_padding"] == "tf_same":
          pad = lambda n: max((math.ceil(n / 2) - 1) * 2 + 3 - n, 0)
          pad_h, pad_w = pad(x.shape[2]), pad(x.shape[3])
          x = functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2),
                             value=-math.inf)
          x = functional.max_pool2d(x, 3, 2)
        else:
          x = functional.max_pool2d(x, 3, 2, 1)
      for group in range(1, 5):
        x = getattr(self, f"layer{group}")(x)
      return x.mean(dim=(2, 3))

  return ResNet()


@pytest.mark.parametrize("fields,image_size", [
    (TINY_R18, 32),
    (dict(depth=18, width_multiplier=0.125), 32),
    (dict(depth=18, width_multiplier=0.125, tf_same_padding=True), 36),
    (dict(depth=50, width_multiplier=0.0625), 40),
])
def test_pytorch_resnet_reproduces_h(tmp_path, fields, image_size):
  torch = pytest.importorskip("torch")
  config = model_config(**fields)
  variables = random_variables(config, image_size=image_size)
  directory = write_export(tmp_path, config, variables)
  tensors_path, description_path = torch_export.export_safetensors(directory, str(tmp_path / "pt"))
  with open(description_path) as f:
    description = json.load(f)
  network = build_torch_resnet(torch, description)
  state = {name: torch.from_numpy(value.copy())
           for name, value in safetensors.numpy.load_file(tensors_path).items()
           if not name.startswith("projection_head.")}
  network.load_state_dict(state, strict=True)
  network.eval()

  images = np.random.default_rng(1).uniform(size=(2, image_size, image_size, 3)).astype(np.float32)
  encoder = models.ResNet(config["depth"], width_multiplier=config["width_multiplier"],
                          cifar_stem=config["cifar_stem"],
                          tf_same_padding=config["tf_same_padding"])
  expected = encoder.apply({"params": variables["params"]["encoder"],
                            "batch_stats": variables["batch_stats"]["encoder"]},
                           images, train=False)["h"]
  with torch.no_grad():
    got = network(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-4, atol=1e-4)
