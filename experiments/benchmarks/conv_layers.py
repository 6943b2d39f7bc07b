r"""Where the train step's time goes on CPU: each 3x3 conv of the CIFAR ResNet-18, by pass.

  python experiments/benchmarks/conv_layers.py [--width=0.25] [--batch_size=128] [--repeats=5]
      [--dtype=float32|bfloat16] [--torch_python=/path/to/venv/bin/python]

For every distinct 3x3 conv shape of the CIFAR-stem ResNet-18 at `--width` (stride 1, the bulk
of its FLOPs) it times, jitted, the three passes of training: forward (y = x * k), input
gradient (dx) and kernel gradient (dk), each as XLA's convolution and as the alternative a user
would try first, im2col patches + one matmul (dk from saved patches too, the best case of a
custom VJP that keeps them), and oneDNN through `simclr_jax.native.conv` (XLA FFI custom
calls): the forward and both gradients together, in `--dtype` (float32: the 'onednn' backend, the
CPU default; bfloat16: 'onednn_bf16'). With --torch_python, the same convolutions in PyTorch
(torch_peer.py --conv_layers), which calls the same oneDNN kernels from eager code: the oneDNN
columns against the PyTorch ones show what reaching them from XLA costs. All figures are GFLOP/s of
the convolution's 2*N*H*W*9*C*K (twice that for dx+dk), next to a matmul of the same dtype,
machine and run (the ceiling), so the table reads as ratios.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from simclr_jax.native import conv as onednn_conv  # noqa: E402
from train_step import PEER_SCRIPT, check_torch_python, run_peer  # noqa: E402

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def best_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=DIMENSIONS)


def patches(x):
  """[N*H*W, 9*C] rows of 3x3 neighbourhoods (zero padded), tap-major like HWIO kernels."""
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  taps = [padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]
  return jnp.concatenate(taps, axis=-1).reshape(n * h * w, 9 * c)


def conv_gflop(batch: int, size: int, channels: int) -> float:
  """GFLOP of one pass of a stride-1 3x3 conv, C -> C channels on size x size images."""
  return 2 * batch * size * size * 9 * channels * channels / 1e9


def layer_row(batch: int, size: int, channels: int, repeats: int, dtype) -> dict[str, float]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((batch, size, size, channels)), dtype)
  kernel = jnp.asarray(rng.random((3, 3, channels, channels)), dtype)
  dy = jnp.asarray(rng.random((batch, size, size, channels)), dtype)
  gflop = conv_gflop(batch, size, channels)

  def vjp_part(index):
    return jax.jit(lambda x, k, dy: jax.vjp(conv, x, k)[1](dy)[index])

  saved = patches(x)
  timings = {
      "xla fwd": best_seconds(jax.jit(conv), x, kernel, repeats=repeats),
      "xla dx": best_seconds(vjp_part(0), x, kernel, dy, repeats=repeats),
      "xla dk": best_seconds(vjp_part(1), x, kernel, dy, repeats=repeats),
      "im2col fwd": best_seconds(jax.jit(lambda x, k: patches(x) @ k.reshape(-1, channels)),
                                 x, kernel, repeats=repeats),
      "im2col dk": best_seconds(jax.jit(lambda x, dy: dy.reshape(-1, channels).T @ patches(x)),
                                x, dy, repeats=repeats),
      "saved-patches dk": best_seconds(jax.jit(lambda p, dy: dy.reshape(-1, channels).T @ p),
                                       saved, dy, repeats=repeats),
  }
  flops = {name: gflop for name in timings}
  # The oneDNN backends take float32 operands; 'onednn_bf16' rounds them to bfloat16 itself.
  onednn = lambda x, k: onednn_conv.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DIMENSIONS, compute_dtype=dtype)
  x32, kernel32, dy32 = (a.astype(jnp.float32) for a in (x, kernel, dy))
  timings["onednn fwd"] = best_seconds(jax.jit(onednn), x32, kernel32, repeats=repeats)
  flops["onednn fwd"] = gflop
  timings["onednn dx+dk"] = best_seconds(jax.jit(lambda x, k, dy: jax.vjp(onednn, x, k)[1](dy)),
                                         x32, kernel32, dy32, repeats=repeats)
  flops["onednn dx+dk"] = 2 * gflop
  return {name: flops[name] / seconds for name, seconds in timings.items()}


def torch_rows(torch_python: str, shapes, *, batch: int, dtype: str, repeats: int) -> list[dict]:
  """GFLOP/s of the same convolutions in PyTorch (torch_peer.py --conv_layers), one per shape."""
  check_torch_python(torch_python)
  layers = run_peer([torch_python, PEER_SCRIPT, f"--batch_size={batch}", f"--precision={dtype}",
                     f"--repeats={repeats}", "--conv_layers=" + ",".join(
                         f"{size}:{channels}" for size, channels in shapes)])["layers"]
  rows = []
  for layer in layers:
    gflop = conv_gflop(batch, layer["size"], layer["channels"])
    rows.append({"pytorch fwd": gflop / layer["fwd"], "pytorch dx+dk": 2 * gflop / layer["dx+dk"]})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--width", type=float, default=0.25)
  parser.add_argument("--batch_size", type=int, default=128, help="images through the conv")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--torch_python", default="",
                      help="an interpreter with torch (requirements-torch.txt): adds PyTorch "
                      "columns")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)

  square = jnp.ones((2048, 2048), dtype)
  ceiling = 2 * 2048 ** 3 / 1e9 / best_seconds(jax.jit(lambda a: a @ a), square,
                                               repeats=args.repeats)
  shapes = [(32, max(1, round(64 * args.width))), (16, max(1, round(128 * args.width))),
            (8, max(1, round(256 * args.width))), (4, max(1, round(512 * args.width)))]
  rows = [(size, channels, layer_row(args.batch_size, size, channels, args.repeats, dtype))
          for size, channels in shapes]
  if args.torch_python:
    peer = torch_rows(args.torch_python, shapes, batch=args.batch_size, dtype=args.dtype,
                      repeats=args.repeats)
    rows = [(size, channels, {**gflops, **torch_gflops})
            for (size, channels, gflops), torch_gflops in zip(rows, peer)]
  names = list(rows[0][2])
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, batch {args.batch_size}, "
        f"width {args.width}, {args.dtype}; 2048^3 matmul ceiling: {ceiling:.0f} GFLOP/s\n")
  print("| conv (HxW, C->C) | " + " | ".join(f"{name} GFLOP/s (% ceiling)" for name in names)
        + " |")
  print("|---|" + "---:|" * len(names))
  for size, channels, gflops in rows:
    cells = " | ".join(f"{gflops[name]:.0f} ({100 * gflops[name] / ceiling:.0f}%)"
                       for name in names)
    print(f"| {size}x{size}, {channels}->{channels} | {cells} |")


if __name__ == "__main__":
  main()
