"""Encoder export for other frameworks: safetensors tensors named like torchvision's ResNet.

`export_safetensors(init_from, out_dir)` writes `model.safetensors` and `model.json`. The tensors
load with `load_state_dict(strict=True)` into a plain PyTorch ResNet of the same depth and width
laid out as torchvision's (`conv1, bn1, layer{1..4}.{b}.conv{i}/bn{i}/downsample.{0,1}`, `fc`), so
that a torchvision `resnet18/34/50/101/152` takes a width-1 export directly, and any other width
needs only the channel counts from `model.json`.

Name and layout mapping (Flax Linen -> PyTorch):
  encoder/stem_conv/kernel            -> conv1.weight
  encoder/stem_bn/{scale,bias}        -> bn1.{weight,bias}
  batch_stats encoder/stem_bn/{mean,var} -> bn1.{running_mean,running_var}
  encoder/block{g}_{b}/conv{i}/kernel -> layer{g}.{b}.conv{i}.weight
  encoder/block{g}_{b}/bn{i}/...      -> layer{g}.{b}.bn{i}.*
  encoder/block{g}_{b}/shortcut_conv  -> layer{g}.{b}.downsample.0.weight
  encoder/block{g}_{b}/shortcut_bn    -> layer{g}.{b}.downsample.1.*
  projection_head/dense_{i}/kernel    -> projection_head.dense_{i}.weight
  projection_head/bn_{i}/...          -> projection_head.bn_{i}.*  (the last BN has no beta in
                                         Flax; its `bias` is written as zeros)
  supervised_head/dense/{kernel,bias} -> fc.{weight,bias}
  every BN also gets num_batches_tracked = 0 (int64), as PyTorch's state dicts carry it.
Layouts: conv kernels HWIO -> OIHW (transpose 3, 2, 0, 1); dense kernels [in, out] -> [out, in].
BN: PyTorch's eps equals ours; its momentum is 1 - ours (0.9 -> 0.1).
Semantics the PyTorch model must follow (all recorded in model.json): input NCHW float RGB in
[0, 1] without mean/std normalisation; every conv pads (k - 1) // 2 on each side; the ImageNet stem
is conv 7x7/2 + BN + ReLU + max-pool 3x3/2 (padding 1, or with `maxpool_padding='tf_same'` one row
and column of -inf at the bottom/right only); the CIFAR stem is conv 3x3/1 + BN + ReLU without
max-pool; basic blocks stride in conv1, bottlenecks in conv2 (ResNet v1.5); a shortcut conv exists
only where the shape changes; h = global average pool of layer4.
Selective-kernel (SimCLRv2 `sk_ratio > 0`) networks are not plain ResNets and are refused.
"""
import json
import os
import re
from typing import Any, Mapping

import numpy as np
import safetensors.numpy

from simclr_jax import export

SAFETENSORS_FILE = "model.safetensors"
ARCHITECTURE_FILE = "model.json"
FORMAT = "simclr_jax.torch_resnet.v1"

_BLOCK_NAME = re.compile(r"^block([1-4])_(\d+)$")
_BLOCK_LAYERS = {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2", "conv3": "conv3",
                 "bn3": "bn3", "shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"}


def _conv_weight(kernel: np.ndarray) -> np.ndarray:
  if kernel.ndim != 4:
    raise ValueError(f"expected an HWIO conv kernel, got shape {kernel.shape}")
  return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


def _batch_norm(prefix: str, params: Mapping[str, Any], stats: Mapping[str, Any]) -> dict:
  mean = np.asarray(stats["mean"], np.float32)
  return {
      f"{prefix}.weight": np.asarray(params["scale"], np.float32),
      f"{prefix}.bias": np.asarray(params.get("bias", np.zeros_like(mean)), np.float32),
      f"{prefix}.running_mean": mean,
      f"{prefix}.running_var": np.asarray(stats["var"], np.float32),
      f"{prefix}.num_batches_tracked": np.zeros((), np.int64),
  }


def _encoder_tensors(params: Mapping[str, Any], stats: Mapping[str, Any]) -> dict:
  tensors = {}
  unexpected = sorted(set(params) - {"stem_conv", "stem_bn"} -
                      {name for name in params if _BLOCK_NAME.match(name)})
  if unexpected:
    raise ValueError(f"encoder layers {unexpected} have no plain-ResNet counterpart (selective "
                     "kernels / ResNet-D stem are not supported by the PyTorch export)")
  tensors["conv1.weight"] = _conv_weight(params["stem_conv"]["kernel"])
  tensors.update(_batch_norm("bn1", params["stem_bn"], stats["stem_bn"]))
  for block_name in sorted(params, key=lambda n: [int(d) for d in re.findall(r"\d+", n)]):
    match = _BLOCK_NAME.match(block_name)
    if not match:
      continue
    prefix = f"layer{match.group(1)}.{match.group(2)}"
    for layer_name, layer_params in params[block_name].items():
      if layer_name not in _BLOCK_LAYERS:
        raise ValueError(f"encoder layer {block_name}/{layer_name} has no plain-ResNet counterpart")
      torch_name = f"{prefix}.{_BLOCK_LAYERS[layer_name]}"
      if "kernel" in layer_params:
        tensors[f"{torch_name}.weight"] = _conv_weight(layer_params["kernel"])
      else:
        tensors.update(_batch_norm(torch_name, layer_params, stats[block_name][layer_name]))
  return tensors


def _projection_head_tensors(params: Mapping[str, Any], stats: Mapping[str, Any]) -> dict:
  tensors = {}
  for name, layer_params in params.items():
    if name.startswith("dense_"):
      tensors[f"projection_head.{name}.weight"] = np.ascontiguousarray(
          np.asarray(layer_params["kernel"], np.float32).T)
    else:
      tensors.update(_batch_norm(f"projection_head.{name}", layer_params, stats[name]))
  return tensors


def torch_state_dict(params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> dict:
  """PyTorch-named, PyTorch-laid-out NumPy tensors of an export's `params`/`batch_stats` trees."""
  tensors = _encoder_tensors(params["encoder"], batch_stats["encoder"])
  if "projection_head" in params:
    tensors.update(_projection_head_tensors(params["projection_head"],
                                            batch_stats.get("projection_head", {})))
  if "supervised_head" in params:
    dense = params["supervised_head"]["dense"]
    tensors["fc.weight"] = np.ascontiguousarray(np.asarray(dense["kernel"], np.float32).T)
    tensors["fc.bias"] = np.asarray(dense["bias"], np.float32)
  return {name: np.asarray(value) for name, value in tensors.items()}


def architecture(model_config: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
  """What a PyTorch ResNet needs to be built to match the tensors (read off the tensors)."""
  if model_config.get("sk_ratio", 0.0) > 0:
    raise ValueError(f"sk_ratio={model_config['sk_ratio']} (SimCLRv2 selective kernels) is not a "
                     "plain ResNet; the PyTorch export supports sk_ratio=0 only")
  encoder = params["encoder"]
  groups = [sorted((name for name in encoder if name.startswith(f"block{g}_")),
                   key=lambda n: int(n.split("_")[1])) for g in range(1, 5)]
  bottleneck = "conv3" in encoder[groups[0][0]]
  stem_kernel = np.shape(encoder["stem_conv"]["kernel"])
  description = {
      "format": FORMAT,
      "depth": int(model_config["depth"]),
      "block": "bottleneck" if bottleneck else "basic",
      "expansion": 4 if bottleneck else 1,
      "layers": [len(group) for group in groups],
      "stem_width": int(stem_kernel[3]),
      "widths": [int(np.shape(encoder[group[0]]["conv1"]["kernel"])[3]) for group in groups],
      "cifar_stem": bool(model_config["cifar_stem"]),
      "stem_kernel_size": int(stem_kernel[0]),
      "stem_stride": 1 if model_config["cifar_stem"] else 2,
      "stem_maxpool": not model_config["cifar_stem"],
      "maxpool_padding": "tf_same" if model_config.get("tf_same_padding") else "symmetric",
      "conv_padding": "(kernel_size - 1) // 2 on each side",
      "bn_eps": float(model_config.get("bn_epsilon", 1e-5)),
      "bn_momentum": round(1.0 - float(model_config.get("bn_momentum", 0.9)), 10),
      "representation_dim": int(np.shape(encoder[groups[3][-1]]["bn3" if bottleneck else "bn2"]
                                         ["scale"])[0]),
      "input": "NCHW float32 RGB in [0, 1], no mean/std normalisation",
      "layout": "torchvision ResNet names (conv1, bn1, layer{g}.{b}.*, downsample.{0,1}, fc); conv "
                "weights OIHW, linear weights [out, in]; see simclr_jax/torch_export.py",
      "projection_head": None,
      "num_classes": None,
      "model_config": dict(model_config),
  }
  if "projection_head" in params:
    head = params["projection_head"]
    num_layers = len([name for name in head if name.startswith("dense_")])
    description["projection_head"] = {
        "num_layers": num_layers,
        "dims": [int(np.shape(head[f"dense_{i}"]["kernel"])[1]) for i in range(num_layers)],
        "layer": "Linear(bias=False) -> BatchNorm1d -> ReLU; the last layer has no ReLU and its "
                 "BN bias is zero",
    }
  if "supervised_head" in params:
    description["num_classes"] = int(np.shape(params["supervised_head"]["dense"]["bias"])[0])
  return description


def export_safetensors(init_from: str, out_dir: str) -> tuple[str, str]:
  """Converts an encoder export to `out_dir/model.safetensors` + `model.json`.

  `init_from` is the export or the workdir holding it in export/ (pretraining, probe, fine-tune).
  """
  encoder_export = export.load_encoder(export.resolve_export_dir(init_from))
  description = architecture(encoder_export.model_config, encoder_export.params)
  tensors = torch_state_dict(encoder_export.params, encoder_export.batch_stats)
  os.makedirs(out_dir, exist_ok=True)
  tensors_path = os.path.join(out_dir, SAFETENSORS_FILE)
  description_path = os.path.join(out_dir, ARCHITECTURE_FILE)
  safetensors.numpy.save_file(tensors, tensors_path,
                              metadata={"format": FORMAT, "architecture": json.dumps(description)})
  with open(description_path, "w") as f:
    json.dump(description, f, indent=2, sort_keys=True)
  return tensors_path, description_path
