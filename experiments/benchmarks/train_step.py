r"""Pretraining step speed against this machine's matmul ceilings and a PyTorch peer.

  python experiments/benchmarks/train_step.py [--widths=0.25,0.5,1] [--batch_size=64]
      [--steps=2] [--repeats=3] [--resnet50] [--conv_backends=xla,onednn,onednn_bf16]
      [--norm_backends=jax,native] [--dtypes=float32,bfloat16]
      [--torch_python=/path/to/venv/bin/python] [--default_malloc]

For each model (CIFAR ResNet-18 at each width, 32 px; with --resnet50 also a ResNet-50 at 224 px)
builds the trainer's own update step (simclr_jax.jobs.pretrain.make_train_step: both views through
the model, NT-Xent + the online probe's loss, here with optim.create_optimizer('sgd') and no
augmentation unless --augment names a preset) on one device, once per convolution backend
(config.conv_backend: XLA's own convolutions; oneDNN's float32 convolutions, the CPU default;
oneDNN's bfloat16 convolutions, the cpu recipe's) and batch norm backend (config.norm_backend:
JAX's nn.BatchNorm; the C++ kernels with the ReLU and residual fused, the CPU default) and compute
dtype (config.dtype: 'bfloat16' keeps the maps in bfloat16 between the layers, as the cpu recipe
and PyTorch's autocast do), and reports image pairs/s (per wall-clock and per CPU second of the
process) and model FLOP/s: XLA's cost analysis of the compiled XLA-backend step (custom calls
are not counted, so it is the count for every backend) divided by the measured step time. Two
baselines are measured in the same run, so the ratios hold better on a loaded machine than
absolute times:
  (a) the ceilings, one per precision, each the best of its matmuls (GFLOP/s = 2 n^3 / time) timed
      before and after the models: float32 rows against XLA's float32 [n, n] matmul; bfloat16
      rows (the 'onednn_bf16' backend, or bfloat16 maps) against the fastest bfloat16 one of
      XLA's dot (which does not reach the CPU's bfloat16 units: slower than its float32 one), the
      project's oneDNN bfloat16 kernels on a matmul-shaped 1x1 convolution (native.conv.forward;
      the same kernels the step's convolutions run) and, with the peer, PyTorch's torch.matmul in
      bfloat16;
  (b) the peer: the same network, loss and optimizer in plain PyTorch on the same CPU
      (torch_peer.py, run with --torch_python, an interpreter that has torch: see
      requirements-torch.txt), in float32, and for bfloat16 rows under bfloat16 autocast.
      The peer's FLOP/s use the same XLA flop count.
Times are the best of --repeats windows of --steps steps after warm-up steps (one for the
compiled JAX step, --torch_warmup for eager PyTorch; other processes only ever add time). Inputs
are random: augmentation and input throughput are measured elsewhere. Both processes keep freed
memory mapped, as the trainer does (simclr_jax.host_memory), unless --default_malloc.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)
from simclr_jax import augment, host_memory, models, native, optim, sharding  # noqa: E402
from simclr_jax.native import conv  # noqa: E402
from simclr_jax.jobs import pretrain  # noqa: E402

NUM_CLASSES = 10
TEMPERATURE = 0.5
# The precision each JAX convolution backend computes in: its ceiling's and its peer's
# (torch_peer.py --precision); any backend computes in bfloat16 on bfloat16 maps.
PRECISION = {"xla": "float32", "onednn": "float32", "onednn_bf16": "bfloat16"}


def precision(conv_backend: str, dtype: str) -> str:
  return "bfloat16" if dtype == "bfloat16" else PRECISION[conv_backend]
# Pixels per image of the 1x1 convolution that is the oneDNN matmul: [n, n] @ [n, n] as n / 256
# images of 16 x 16, which the kernels split over the threads like the step's batches.
ONEDNN_MATMUL_PIXELS = 16
PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_peer.py")


def model_config(depth: int, width_multiplier: float, cifar_stem: bool) -> dict:
  return {"depth": depth, "width_multiplier": width_multiplier, "cifar_stem": cifar_stem}


def build_pretrain_step(model_config_: dict, *, batch_size: int, image_size: int,
                        augment_preset: str = "none", conv_backend: str = "xla",
                        norm_backend: str = "jax", dtype: str = "float32", seed: int = 0
                        ) -> tuple[Callable, tuple[Any, Any]]:
  """The trainer's own update step (jobs.pretrain.make_train_step) on one device, with SGD.

  Returns (step, (state, batch)); step(state, batch) -> (state, metrics) donates the state, as in
  training. The batch holds random uint8 images; `augment_preset` 'none' leaves only the uint8 to
  float conversion, so the step is the model, loss and optimizer the PyTorch peer runs.
  """
  mesh = jax.make_mesh((1,), (sharding.DATA_AXIS,), devices=jax.devices()[:1])
  model = models.create_model(model_config_, num_classes=NUM_CLASSES, axis_name=sharding.DATA_AXIS,
                              conv_backend=conv_backend, norm_backend=norm_backend,
                              dtype=models.COMPUTE_DTYPES[dtype])
  learning_rate = optax.constant_schedule(0.1)
  optimizer = optim.create_optimizer("sgd", learning_rate, weight_decay=1e-6, momentum=0.9)
  augment_view = augment.build_augmentation(augment.get_preset(augment_preset), image_size)
  state = pretrain.create_train_state(model, optimizer, seed=seed, image_size=image_size,
                                      mesh=mesh)
  rng = np.random.default_rng(seed)
  batch = jax.device_put({
      "image": rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),
      "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
      "index": np.arange(batch_size, dtype=np.int32),
  }, jax.NamedSharding(mesh, jax.P(sharding.DATA_AXIS)))
  step = pretrain.make_train_step(model, optimizer, augment_view, temperature=TEMPERATURE,
                               learning_rate_fn=learning_rate, mesh=mesh)
  return step, (state, batch)


def best_seconds_per_call(run: Callable[[], Any], *, calls: int, repeats: int,
                          warmup: int = 1) -> tuple[float, float]:
  """(wall, CPU) seconds per call, each the best (min) over `repeats` windows; run() must block.

  CPU time is this process's, all threads: on a shared machine it moves far less than wall time.
  """
  for _ in range(warmup):
    run()
  walls, cpus = [], []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
      run()
    walls.append((time.perf_counter() - wall) / calls)
    cpus.append((time.process_time() - cpu) / calls)
  return min(walls), min(cpus)


def flops_of(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returned one dict per device program
    analysis = analysis[0]
  return float(analysis["flops"])


def measure_matmul(size: int, repeats: int, dtype=jnp.float32, onednn: bool = False) -> float:
  """GFLOP/s of [size, size] @ [size, size] in `dtype`: XLA's dot, or with `onednn` the project's
  oneDNN kernels as a 1x1 convolution (native.conv.forward) of size / 256 images of 16 x 16."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((size, size), np.float32), dtype) for _ in range(2))
  if onednn:
    side = ONEDNN_MATMUL_PIXELS
    a = a.reshape(size // side**2, side, side, size)
    b = b.reshape(1, 1, size, size)
    matmul = jax.jit(conv.forward)
  else:
    matmul = jax.jit(jnp.matmul)
  seconds, _ = best_seconds_per_call(lambda: matmul(a, b).block_until_ready(), calls=3,
                                     repeats=repeats)
  return 2 * size**3 / seconds / 1e9


def measure_ceilings(size: int, repeats: int, torch_python: str, precisions: set[str],
                     env: dict) -> dict[tuple[str, str], float]:
  """GFLOP/s of each matmul measured for `precisions`, keyed by (precision, what ran it); the
  peer's runs with `env` (peer_env)."""
  ceilings = {("float32", "XLA dot"): measure_matmul(size, repeats)}
  if "bfloat16" in precisions:
    ceilings["bfloat16", "XLA dot"] = measure_matmul(size, repeats, jnp.bfloat16)
    ceilings["bfloat16", "oneDNN 1x1 conv"] = measure_matmul(size, repeats, jnp.bfloat16,
                                                             onednn=True)
    if torch_python:
      ceilings["bfloat16", "PyTorch matmul"] = run_peer(
          [torch_python, PEER_SCRIPT, f"--matmul={size}", "--precision=bfloat16",
           f"--repeats={3 * repeats}"], env=env)["gflops"]
  return ceilings


def measure_jax(config: dict, *, batch_size: int, image_size: int, steps: int, repeats: int,
                augment_preset: str, conv_backend: str, norm_backend: str = "jax",
                dtype: str = "float32") -> dict:
  step, (state, batch) = build_pretrain_step(config, batch_size=batch_size,
                                             image_size=image_size, augment_preset=augment_preset,
                                             conv_backend=conv_backend, norm_backend=norm_backend,
                                             dtype=dtype)
  compiled = step.lower(state, batch).compile()
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    metrics["loss"].block_until_ready()

  seconds, cpu_seconds = best_seconds_per_call(run, calls=steps, repeats=repeats)
  return {"seconds": seconds, "cpu_seconds": cpu_seconds, "flops": flops_of(compiled)}


def peer_env(omp_wait_policy: str, keep_freed_memory: bool = True) -> dict:
  """The peer's environment: `omp_wait_policy` ('' = OpenMP's default), and with
  `keep_freed_memory` glibc's malloc as host_memory sets this process's."""
  env = dict(os.environ)
  if keep_freed_memory:
    env["GLIBC_TUNABLES"] = host_memory.GLIBC_TUNABLES
  if omp_wait_policy:
    env["OMP_WAIT_POLICY"] = omp_wait_policy
  return env


def measure_torch(torch_python: str, config: dict, *, batch_size: int, image_size: int,
                  steps: int, repeats: int, warmup: int, precision: str, env: dict) -> dict:
  """Runs torch_peer.py's step in `env` (peer_env)."""
  command = [torch_python, PEER_SCRIPT, f"--depth={config['depth']}",
             f"--width_multiplier={config['width_multiplier']}", f"--image_size={image_size}",
             f"--batch_size={batch_size}", f"--num_classes={NUM_CLASSES}", f"--steps={steps}",
             f"--repeats={repeats}", f"--warmup={warmup}", f"--precision={precision}"] + (
                 ["--cifar_stem"] if config["cifar_stem"] else [])
  result = run_peer(command, env=env)
  return {"seconds": result["seconds_per_step"], "cpu_seconds": result["cpu_seconds_per_step"],
          "torch": result["torch"], "threads": result["threads"]}


def run_peer(command: list[str], env: dict | None = None) -> dict:
  """Runs a torch_peer.py command and returns the JSON line it prints last."""
  completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  if completed.returncode != 0:
    raise RuntimeError(f"the PyTorch peer failed ({' '.join(command)}):\n{completed.stderr}")
  return json.loads(completed.stdout.strip().splitlines()[-1])


def check_torch_python(torch_python: str) -> None:
  """Fails before any measurement if the peer's interpreter cannot import torch."""
  try:
    completed = subprocess.run([torch_python, "-c", "import torch"], capture_output=True,
                               text=True, check=False)
  except OSError as e:
    raise ValueError(f"--torch_python={torch_python!r} cannot be run ({e})") from e
  if completed.returncode != 0:
    raise ValueError(f"--torch_python={torch_python!r} cannot import torch; install it with "
                     "`python3 -m venv VENV && VENV/bin/pip install -r "
                     "experiments/benchmarks/requirements-torch.txt`")


def _rate(value: float) -> str:
  return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def table(rows: list[dict], ceilings: dict[str, tuple[str, float]], has_peer: bool) -> str:
  """Markdown; each row against the ceiling of its precision (`ceilings`: precision -> (what
  ran it, GFLOP/s)); 'per CPU-s' columns divide by process CPU time (steadier when shared)."""
  header = ["model", "pairs/step", "JAX pairs/s", "JAX pairs/CPU-s", "JAX GFLOP/s", "ceiling",
            "JAX % of ceiling"]
  if has_peer:
    header += ["PyTorch pairs/s", "PyTorch pairs/CPU-s", "PyTorch % of ceiling",
               "JAX / PyTorch (wall)", "JAX / PyTorch (CPU)"]
  lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
  for r in rows:
    batch = r["batch_size"]
    _, ceiling = ceilings[r["precision"]]
    jax_gflops = r["flops"] / r["jax_seconds"] / 1e9
    cells = [r["name"], f"{batch}", _rate(batch / r["jax_seconds"]),
             _rate(batch / r["jax_cpu_seconds"]), f"{jax_gflops:.1f}",
             f"{r['precision']} {ceiling:.0f}", f"{100 * jax_gflops / ceiling:.0f}%"]
    if has_peer:
      torch_gflops = r["flops"] / r["torch_seconds"] / 1e9
      cells += [_rate(batch / r["torch_seconds"]), _rate(batch / r["torch_cpu_seconds"]),
                f"{100 * torch_gflops / ceiling:.0f}%",
                f"{r['torch_seconds'] / r['jax_seconds']:.2f}x",
                f"{r['torch_cpu_seconds'] / r['jax_cpu_seconds']:.2f}x"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def best_ceilings(runs: list[dict[tuple[str, str], float]]) -> dict[str, tuple[str, float]]:
  """precision -> (what ran it, GFLOP/s): the fastest matmul of each precision in any run."""
  best = {}
  for (precision, source), gflops in ((key, max(run[key] for run in runs)) for key in runs[0]):
    if gflops > best.get(precision, ("", 0.0))[1]:
      best[precision] = (source, gflops)
  return best


def main(argv) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--widths", default="0.25,0.5,1", help="CIFAR ResNet-18 width multipliers")
  parser.add_argument("--batch_size", type=int, default=64, help="image pairs per step")
  parser.add_argument("--steps", type=int, default=2, help="steps per timed window")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows; the best is kept")
  parser.add_argument("--resnet50", action="store_true",
                      help="add a ResNet-50 at 224 px (slow: --resnet50_batch_size pairs)")
  parser.add_argument("--resnet50_batch_size", type=int, default=8)
  parser.add_argument("--matmul_size", type=int, default=2048)
  parser.add_argument("--augment", default="none",
                      help="augmentation preset inside the JAX step (the peer never augments)")
  parser.add_argument("--conv_backends", default="xla,onednn,onednn_bf16",
                      help="convolution backends to time the JAX step with (config.conv_backend)")
  parser.add_argument("--norm_backends", default="jax,native",
                      help="batch norm backends to time each convolution backend with "
                      "(config.norm_backend)")
  parser.add_argument("--dtypes", default="float32",
                      help="compute dtypes to time each backend pair with (config.dtype; "
                      "'bfloat16': bfloat16 maps between the layers)")
  parser.add_argument("--torch_python", default="",
                      help="interpreter with torch for the PyTorch peer (omit to skip the peer)")
  parser.add_argument("--torch_omp_wait_policy", default="PASSIVE",
                      help="OMP_WAIT_POLICY of the peer: PASSIVE keeps PyTorch's OpenMP threads "
                      "from spinning when other processes share the cores (3x slower steps on "
                      "this machine when busy); '' leaves OpenMP's default")
  parser.add_argument("--torch_warmup", type=int, default=3,
                      help="untimed peer steps (JAX's warm-up is compiling plus one step; eager "
                      "PyTorch takes a few steps to settle)")
  parser.add_argument("--default_malloc", action="store_true",
                      help="leave glibc's malloc as it is in both processes, to measure what "
                      "simclr_jax.host_memory.keep_freed_memory gains")
  args = parser.parse_args(argv)
  if not args.default_malloc:
    host_memory.keep_freed_memory()  # as the trainer does (simclr_jax.main), before JAX's threads
  if args.torch_python:
    check_torch_python(args.torch_python)

  conv_backends = args.conv_backends.split(",")
  for backend in conv_backends:
    native.resolve_backend("conv_backend", backend)
  norm_backends = args.norm_backends.split(",")
  for backend in norm_backends:
    native.resolve_backend("norm_backend", backend)
  dtypes = args.dtypes.split(",")
  for dtype in dtypes:
    if dtype not in models.COMPUTE_DTYPES:
      raise ValueError(f"--dtypes: {dtype!r}; allowed: {', '.join(models.COMPUTE_DTYPES)}")
  widths = [float(w) for w in args.widths.split(",")]
  runs = [(f"ResNet-18 CIFAR w={w:g}, 32 px", model_config(18, w, True), args.batch_size, 32)
          for w in widths]
  if args.resnet50:
    runs.append(("ResNet-50 w=1, 224 px", model_config(50, 1.0, False), args.resnet50_batch_size,
                 224))
  if args.matmul_size % ONEDNN_MATMUL_PIXELS**2:
    raise ValueError(f"--matmul_size={args.matmul_size}: must be a multiple of "
                     f"{ONEDNN_MATMUL_PIXELS**2} (the oneDNN matmul's images)")
  env = peer_env(args.torch_omp_wait_policy, keep_freed_memory=not args.default_malloc)
  precisions = {precision(b, dtype) for b in conv_backends for dtype in dtypes}
  measure_all_ceilings = lambda: measure_ceilings(args.matmul_size, args.repeats,
                                                  args.torch_python, precisions, env)
  ceiling_runs = [measure_all_ceilings()]
  rows = []
  for name, config, batch_size, image_size in runs:
    timing = dict(steps=args.steps, repeats=args.repeats, batch_size=batch_size,
                  image_size=image_size)
    jax_results = {(conv, norm, dtype): measure_jax(
        config, augment_preset=args.augment, conv_backend=conv, norm_backend=norm, dtype=dtype,
        **timing) for conv in conv_backends for norm in norm_backends for dtype in dtypes}
    flops = (jax_results["xla", "jax", "float32"] if ("xla", "jax", "float32") in jax_results else
             measure_jax(config, augment_preset=args.augment, conv_backend="xla",
                         **dict(timing, steps=1, repeats=1)))["flops"]
    if args.torch_python:
      peers = {name: measure_torch(args.torch_python, config, warmup=args.torch_warmup,
                                   precision=name, env=env, **timing)
               for name in sorted(precisions)}
      any_peer = next(iter(peers.values()))
      peer = (f"PyTorch {any_peer['torch']} with {any_peer['threads']} threads, "
              f"OMP_WAIT_POLICY={args.torch_omp_wait_policy or 'default'}")
    for (backend, norm, dtype), jax_result in jax_results.items():
      maps = ", bfloat16 maps" if dtype == "bfloat16" else ""
      row = {"name": f"{name}, {backend} convs, {norm} BN{maps}", "batch_size": batch_size,
             "flops": flops, "precision": precision(backend, dtype),
             "jax_seconds": jax_result["seconds"], "jax_cpu_seconds": jax_result["cpu_seconds"]}
      if args.torch_python:
        torch_result = peers[row["precision"]]
        row.update(torch_seconds=torch_result["seconds"],
                   torch_cpu_seconds=torch_result["cpu_seconds"])
      rows.append(row)
    print(f"measured {name}", file=sys.stderr, flush=True)
  ceiling_runs.append(measure_all_ceilings())
  ceilings = best_ceilings(ceiling_runs)
  measured = "; ".join(
      f"{precision} {source} {', '.join(f'{run[precision, source]:.0f}' for run in ceiling_runs)}"
      for precision, source in ceiling_runs[0])
  print(f"SimCLR pretraining step (jobs.pretrain.make_train_step, float32 parameters, SGD, "
        f"NT-Xent + online probe, augment={args.augment!r}), jax {jax.__version__} "
        f"on {jax.devices()[0].platform} x{os.cpu_count()} cores, "
        f"{datetime.date.today().isoformat()}. Ceilings ({args.matmul_size}^3 matmuls, best of "
        f"before/after the models): "
        + ", ".join(f"{precision} {gflops:.0f} GFLOP/s ({source})"
                    for precision, (source, gflops) in ceilings.items())
        + f" [all, GFLOP/s before, after: {measured}]"
        + (f"; peer: {peer}." if args.torch_python else "; no PyTorch peer (--torch_python)."))
  print()
  print(table(rows, ceilings, bool(args.torch_python)))


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except ValueError as error:
    sys.exit(f"train_step.py: error: {error}")
