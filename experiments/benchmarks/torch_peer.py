r"""The PyTorch peer of train_step.py: the same SimCLR step in plain PyTorch on this CPU.

  /path/to/torch/venv/bin/python experiments/benchmarks/torch_peer.py --depth=18 \
      --width_multiplier=0.25 --cifar_stem --image_size=32 --batch_size=64 --steps=2 --repeats=3 \
      [--precision=bfloat16]

Runs in its own interpreter (torch stays out of the project's requirements: see
requirements-torch.txt) and prints one JSON line with the best wall and process-CPU seconds per
step. The network mirrors simclr_jax.models: ResNet v1.5 (basic blocks with a projection
shortcut only where the shape changes, bottleneck stride on the 3x3), CIFAR stem or 7x7/max-pool
stem, 2-layer projection head (Dense -> BN -> ReLU -> Dense -> BN, no dense biases), an online
linear probe on detached h, NT-Xent over both views of the batch (batch norm over both views
together, as the JAX step), and SGD with momentum 0.9 and weight decay. Only speed is compared,
so inputs are random tensors.
Float32 by default; --precision=bfloat16 runs the forward pass under `torch.autocast` (convolutions
and matmuls in bfloat16, parameters float32), the peer of conv_backend='onednn_bf16'.

With --conv_layers=SIZE:CHANNELS,... it times single stride-1 3x3 convolutions instead (the peer
of conv_layers.py): the forward and the backward (input and kernel gradients together) of each,
batch --batch_size images, channels-last, in --precision. With --matmul=SIZE it times
torch.matmul of two [SIZE, SIZE] matrices in --precision (train_step.py's ceiling from PyTorch).
"""
import argparse
import json
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

BLOCK_GROUPS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


def scaled(channels: int, width_multiplier: float) -> int:
  return max(1, int(round(channels * width_multiplier)))


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
  conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False)
  return nn.Sequential(conv, nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1))


class Block(nn.Module):
  """Basic (3x3, 3x3) or v1.5 bottleneck (1x1, 3x3 stride, 1x1 x4) residual block."""

  def __init__(self, kind: str, in_channels: int, filters: int, stride: int):
    super().__init__()
    out_channels = filters * (4 if kind == "bottleneck" else 1)
    if kind == "bottleneck":
      self.layers = nn.ModuleList([conv_bn(in_channels, filters, 1, 1),
                                   conv_bn(filters, filters, 3, stride),
                                   conv_bn(filters, out_channels, 1, 1)])
    else:
      self.layers = nn.ModuleList([conv_bn(in_channels, filters, 3, stride),
                                   conv_bn(filters, filters, 3, 1)])
    self.shortcut = (conv_bn(in_channels, out_channels, 1, stride)
                     if stride != 1 or in_channels != out_channels else nn.Identity())
    self.out_channels = out_channels

  def forward(self, x):
    y = x
    for index, layer in enumerate(self.layers):
      y = layer(y)
      if index < len(self.layers) - 1:
        y = F.relu(y)
    return F.relu(y + self.shortcut(x))


class SimCLRNet(nn.Module):
  """ResNet encoder + projection head + linear probe on detached h."""

  def __init__(self, depth: int, width_multiplier: float, cifar_stem: bool, num_classes: int,
               projection_dim: int = 128):
    super().__init__()
    kind, group_sizes = BLOCK_GROUPS[depth]
    width = scaled(64, width_multiplier)
    if cifar_stem:
      self.stem = nn.Sequential(conv_bn(3, width, 3, 1), nn.ReLU())
    else:
      self.stem = nn.Sequential(conv_bn(3, width, 7, 2), nn.ReLU(),
                                nn.MaxPool2d(3, stride=2, padding=1))
    blocks, channels = [], width
    for group, num_blocks in enumerate(group_sizes, start=1):
      filters = scaled(64 * 2 ** (group - 1), width_multiplier)
      for index in range(num_blocks):
        block = Block(kind, channels, filters, 2 if group > 1 and index == 0 else 1)
        blocks.append(block)
        channels = block.out_channels
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Sequential(nn.Linear(channels, channels, bias=False), nn.BatchNorm1d(channels),
                              nn.ReLU(), nn.Linear(channels, projection_dim, bias=False),
                              nn.BatchNorm1d(projection_dim))
    self.linear_head = nn.Linear(channels, num_classes)

  def forward(self, x):
    h = self.blocks(self.stem(x)).mean(dim=(2, 3))
    return self.head(h), self.linear_head(h.detach())


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
  """Mean over the 2N anchors; each anchor's candidates are the other 2N-1 views."""
  z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
  n = z1.shape[0]
  self_mask = torch.eye(n, dtype=torch.bool)
  targets = torch.arange(n)
  loss = 0.0
  for anchors, same, other in ((z1, z1, z2), (z2, z2, z1)):
    logits_other = anchors @ other.T / temperature
    logits_same = (anchors @ same.T / temperature).masked_fill(self_mask, -1e9)
    loss = loss + F.cross_entropy(torch.cat([logits_other, logits_same], dim=1), targets)
  return loss / 2


def best_seconds(function, *, repeats: int, warmup: int) -> float:
  """The fastest of `repeats` calls of function() after `warmup` untimed ones."""
  for _ in range(warmup):
    function()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    function()
    times.append(time.perf_counter() - start)
  return min(times)


def matmul_gflops(size: int, *, precision: str, repeats: int, warmup: int) -> float:
  """GFLOP/s (2 size^3 / time) of torch.matmul on two [size, size] matrices in `precision`."""
  dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
  a, b = (torch.rand(size, size).to(dtype) for _ in range(2))
  with torch.no_grad():
    return 2 * size**3 / best_seconds(lambda: torch.matmul(a, b), repeats=repeats,
                                      warmup=warmup) / 1e9


def conv_layer_seconds(size: int, channels: int, *, batch: int, precision: str, repeats: int,
                       warmup: int) -> dict:
  """Best seconds of one 3x3 convolution's forward and of its backward (dx and dk)."""
  dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
  channels_last = lambda t: t.to(dtype).contiguous(memory_format=torch.channels_last)
  x = channels_last(torch.rand(batch, channels, size, size))
  kernel = channels_last(torch.rand(channels, channels, 3, 3))
  dy = channels_last(torch.rand(batch, channels, size, size))

  def forward():
    return F.conv2d(x, kernel, padding=1)

  def backward():
    return torch.ops.aten.convolution_backward(dy, x, kernel, None, [1, 1], [1, 1], [1, 1], False,
                                               [0, 0], 1, [True, True, False])

  with torch.no_grad():
    return {"size": size, "channels": channels,
            "fwd": best_seconds(forward, repeats=repeats, warmup=warmup),
            "dx+dk": best_seconds(backward, repeats=repeats, warmup=warmup)}


def main(argv) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--depth", type=int, default=18, choices=sorted(BLOCK_GROUPS))
  parser.add_argument("--width_multiplier", type=float, default=1.0)
  parser.add_argument("--cifar_stem", action="store_true")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=64, help="image pairs per step")
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--steps", type=int, default=2, help="steps per timed window")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows; the best is kept")
  parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--warmup", type=int, default=3,
                      help="untimed steps first: eager PyTorch needs a few (oneDNN primitive "
                      "creation, allocator caches) before its step time settles")
  parser.add_argument("--conv_layers", default="",
                      help="SIZE:CHANNELS,...: time these 3x3 convolutions instead of the step")
  parser.add_argument("--matmul", type=int, default=0,
                      help="SIZE: time a [SIZE, SIZE] matmul instead of the step")
  args = parser.parse_args(argv)

  if args.matmul:
    print(json.dumps({"gflops": matmul_gflops(args.matmul, precision=args.precision,
                                              repeats=args.repeats, warmup=args.warmup),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))
    return
  if args.conv_layers:
    layers = [tuple(int(n) for n in layer.split(":")) for layer in args.conv_layers.split(",")]
    print(json.dumps({"layers": [conv_layer_seconds(
        size, channels, batch=args.batch_size, precision=args.precision, repeats=args.repeats,
        warmup=args.warmup) for size, channels in layers], "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))
    return

  torch.manual_seed(0)
  model = SimCLRNet(args.depth, args.width_multiplier, args.cifar_stem, args.num_classes)
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
  views = torch.rand(2 * args.batch_size, 3, args.image_size, args.image_size)
  labels = torch.randint(0, args.num_classes, (args.batch_size,)).repeat(2)

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bfloat16"):
      z, probe_logits = model(views)
      z1, z2 = z.chunk(2)
      loss = nt_xent(z1, z2, temperature=0.5) + F.cross_entropy(probe_logits, labels)
    loss.backward()
    optimizer.step()
    return loss.item()

  for _ in range(args.warmup):
    step()
  walls, cpus = [], []
  for _ in range(args.repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
      step()
    walls.append((time.perf_counter() - wall) / args.steps)
    cpus.append((time.process_time() - cpu) / args.steps)
  print(json.dumps({"seconds_per_step": min(walls), "cpu_seconds_per_step": min(cpus),
                    "window_seconds_per_step": walls, "torch": torch.__version__,
                    "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main(sys.argv[1:])
