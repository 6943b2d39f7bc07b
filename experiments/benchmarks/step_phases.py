r"""Where the pretraining step's time goes, phase by phase, from XLA's own profile of the real step.

  python experiments/benchmarks/step_phases.py [--widths=0.25,0.5,1] [--batch_size=64]
      [--steps=3] [--repeats=3] [--conv_backend=onednn_bf16] [--norm_backend=native]
      [--dtype=bfloat16] [--augment=simclr_cifar] [--image_size=32] [--matmul_size=2048]

Builds train_step.py's step (the trainer's jobs.pretrain.make_train_step, SGD) for the CIFAR
ResNet-18 at each width, by default as the `cpu` recipe runs it: oneDNN bfloat16 convolutions,
the native batch norm, bfloat16 maps between the layers (--dtype=float32: float32 maps, cast to
bfloat16 at each convolution), and the simclr_cifar augmentation on the native backend inside
the step.
It times the step (best of --repeats windows of --steps), then records --steps more under
jax.profiler with XLA's per-thunk trace events on (XLA_FLAGS=--xla_cpu_enable_xprof_traceme, set
here before JAX starts), and sums each top-level thunk's time into a phase by what the compiled
HLO says the thunk is: its custom-call target (the oneDNN convolution passes, the batch norm
kernels, the augmentation kernel), else the source file and function that made it (the casts to
bfloat16 in native/conv.py, batch norm's statistics, losses.nt_xent, optax and the state update,
the augmentation's random draws; the rest is "other"). Profiling the real step, rather than
timing each phase as its own jitted function, keeps XLA's fusions, buffers and thread use as
training has them, and the phases add up to the traced step by construction, less the time
between thunks (dispatch, waits) shown as the difference. The convolution passes are also given
in GFLOP/s (from their operand shapes) against the bfloat16 ceiling measured in the same run: the
same oneDNN kernels on a matmul-shaped 1x1 convolution (train_step.measure_matmul).
"""
import argparse
import collections
import datetime
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import NamedTuple

import flax.linen
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (puts the repository root on sys.path)
from simclr_jax import augment, host_memory, losses, loop, models, native  # noqa: E402
from simclr_jax.models import batch_norm as model_batch_norm  # noqa: E402
from simclr_jax.native import augment as native_augment  # noqa: E402
from simclr_jax.native import batch_norm as native_batch_norm  # noqa: E402
from simclr_jax.native import conv as native_conv  # noqa: E402

TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme"
CONV_PASSES = {native_conv.FORWARD: "conv forward",
               native_conv.BACKWARD_DATA: "conv input gradient",
               native_conv.BACKWARD_WEIGHTS: "conv kernel gradient"}
CASTS = "casts to the conv compute dtype"
BN_KERNELS = "batch norm kernels (+ReLU, residual)"
BN_XLA = "batch norm in XLA (statistics, head BNs)"
NT_XENT = "NT-Xent forward + backward"
OPTIMIZER = "optimizer update (+ grad/param norms)"
AUGMENTATION = "augmentation (kernel + random draws)"
OTHER = "other (heads, pooling, probe, elementwise)"
PHASES = (*CONV_PASSES.values(), CASTS, BN_KERNELS, BN_XLA, NT_XENT, OPTIMIZER, AUGMENTATION,
          OTHER)
# Source files (and folders) of the XLA ops of each phase, as the HLO's stack frames name them.
_FILES = {
    CASTS: (native_conv.__file__,),
    BN_XLA: (native_batch_norm.__file__, model_batch_norm.__file__,
             flax.linen.normalization.__file__),
    AUGMENTATION: (os.path.dirname(augment.__file__) + os.sep, native_augment.__file__),
    OPTIMIZER: (os.path.dirname(optax.__file__) + os.sep, loop.__file__),
}


class Instruction(NamedTuple):
  """What a top-level thunk of the compiled step is: HLO opcode, custom-call target ('' if
  none), the innermost source file and function that made it ('' if unknown), and its shapes
  (result, then operands; for custom calls only)."""
  opcode: str
  target: str
  file: str
  function: str
  shapes: tuple[tuple[int, ...], ...]


def _table(hlo_text: str, name: str) -> dict[int, str]:
  """A numbered table of the HLO text's stack-frame index (FileNames, FunctionNames, ...)."""
  match = re.search(rf"^{name}\n(.*?)\n\n", hlo_text, re.S | re.M)
  return {} if match is None else {int(k): v for k, v in
                                   re.findall(r"^(\d+) (.*)$", match.group(1), re.M)}


def _field(text: str, name: str) -> int:
  return int(re.search(rf"\b{name}=(\d+)", text).group(1))


def _shapes(text: str) -> list[tuple[int, ...]]:
  return [tuple(int(d) for d in dims.split(",") if d) for dims in
          re.findall(r"\b(?:bf16|f32|f16|s32|u32|u8|pred)\[([\d,]*)\]", text)]


def entry_instructions(hlo_text: str) -> dict[str, Instruction]:
  """The compiled module's entry computation (compiled.as_text()): instruction name -> what it
  is. Thunks of nested computations (loop bodies) run inside their top-level instruction's."""
  files = {k: v.strip('"') for k, v in _table(hlo_text, "FileNames").items()}
  functions = {k: v.strip('"') for k, v in _table(hlo_text, "FunctionNames").items()}
  locations = {k: (files[_field(v, "file_name_id")], functions[_field(v, "function_name_id")])
               for k, v in _table(hlo_text, "FileLocations").items()}
  frames = {k: locations[_field(v, "file_location_id")]
            for k, v in _table(hlo_text, "StackFrames").items()}
  entry = hlo_text[hlo_text.index("\nENTRY "):]
  instructions = {}
  for line in entry[:entry.index("\n}\n")].splitlines()[1:]:
    match = re.match(r"\s*(?:ROOT )?%(\S+) = (.*?) ([\w-]+)\(", line)
    if match is None:
      continue
    name, result_type, opcode = match.groups()
    target = re.search(r'custom_call_target="([^"]+)"', line)
    frame = re.search(r"stack_frame_id=(\d+)", line)
    file, function = frames.get(int(frame.group(1)), ("", "")) if frame else ("", "")
    operands = re.search(r"operand_layout_constraints=\{(.*?\})\}", line)
    shapes = (_shapes(result_type) + _shapes(operands.group(1))) if target and operands else []
    instructions[name] = Instruction(opcode, target.group(1) if target else "", file, function,
                                     tuple(shapes))
  return instructions


def phase_of(instruction: Instruction) -> str:
  """The phase (one of PHASES) a top-level instruction's time counts to."""
  if instruction.target in CONV_PASSES:
    return CONV_PASSES[instruction.target]
  if instruction.target in native_batch_norm.TARGETS:
    return BN_KERNELS
  if instruction.target == native_augment.TARGET:
    return AUGMENTATION
  if instruction.file == losses.__file__:
    return OTHER if instruction.function.startswith("classification_metrics") else NT_XENT
  for phase, files in _FILES.items():
    if any(instruction.file == f or (f.endswith(os.sep) and instruction.file.startswith(f))
           for f in files):
      return phase
  return OTHER


def conv_gflop(instruction: Instruction) -> float:
  """GFLOP of one oneDNN convolution pass: 2 * output (or output-gradient) elements * kh*kw*C."""
  result, first, second = instruction.shapes
  if instruction.target == native_conv.BACKWARD_WEIGHTS:
    kernel, outputs = result, second  # (x, dy) -> dk
  elif instruction.target == native_conv.BACKWARD_DATA:
    kernel, outputs = second, first  # (dy, k) -> dx
  else:
    kernel, outputs = second, result  # (x, k) -> y
  return 2 * math.prod(outputs) * math.prod(kernel[:3]) / 1e9


def thunk_seconds(trace_dir: str) -> collections.Counter:
  """Seconds per thunk name, summed over a jax.profiler trace (its Perfetto JSON)."""
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if len(paths) != 1:
    raise RuntimeError(f"expected one perfetto_trace.json.gz in the trace, found {len(paths)}")
  with gzip.open(paths[0]) as trace_file:
    trace = json.load(trace_file)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  seconds = collections.Counter()
  for event in events:
    if event.get("ph") == "X":
      seconds[event["name"]] += event["dur"] / 1e6
  return seconds


def measure(config: dict, *, batch_size: int, image_size: int, augment_preset: str,
            conv_backend: str, norm_backend: str, dtype: str, steps: int, repeats: int) -> dict:
  """Per step: seconds of each phase (traced), the traced step and the untraced step (best of
  `repeats` windows), and the convolution passes' GFLOP."""
  step, (state, batch) = train_step.build_pretrain_step(
      config, batch_size=batch_size, image_size=image_size, augment_preset=augment_preset,
      conv_backend=conv_backend, norm_backend=norm_backend, dtype=dtype)
  compiled = step.lower(state, batch).compile()
  instructions = entry_instructions(compiled.as_text())
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    metrics["loss"].block_until_ready()

  step_seconds, _ = train_step.best_seconds_per_call(run, calls=steps, repeats=repeats)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(steps):
        run()
      traced_seconds = (time.perf_counter() - start) / steps
    seconds = thunk_seconds(trace_dir)
  phases = dict.fromkeys(PHASES, 0.0)
  conv_gflops = dict.fromkeys(CONV_PASSES.values(), 0.0)
  for name, instruction in instructions.items():
    phases[phase_of(instruction)] += seconds[name] / steps
    if instruction.target in CONV_PASSES:
      conv_gflops[CONV_PASSES[instruction.target]] += conv_gflop(instruction)
  if not any(phases.values()):
    raise RuntimeError(f"the trace has no thunk events: XLA_FLAGS needs {TRACEME_FLAG} "
                       "before JAX starts its CPU backend (main() sets it)")
  return {"phases": phases, "traced_seconds": traced_seconds, "step_seconds": step_seconds,
          "conv_gflop": conv_gflops}


def table(results: dict[str, dict], ceiling_gflops: float) -> str:
  """Markdown: a row per phase, a column per model: ms per step (% of the traced step)."""
  header = ["phase"] + list(results)
  lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(results)]
  ms = lambda seconds, r: f"{1e3 * seconds:.1f} ({100 * seconds / r['traced_seconds']:.0f}%)"
  for phase in PHASES:
    lines.append(f"| {phase} | " + " | ".join(ms(r["phases"][phase], r)
                                              for r in results.values()) + " |")
  lines.append("| **sum of the phases** | " + " | ".join(
      ms(sum(r["phases"].values()), r) for r in results.values()) + " |")
  lines.append("| step, traced | " + " | ".join(
      f"{1e3 * r['traced_seconds']:.1f}" for r in results.values()) + " |")
  lines.append("| step, untraced (best window) | " + " | ".join(
      f"{1e3 * r['step_seconds']:.1f}" for r in results.values()) + " |")
  for conv_pass in CONV_PASSES.values():
    cells = []
    for r in results.values():
      gflops = r["conv_gflop"][conv_pass] / r["phases"][conv_pass]
      cells.append(f"{gflops:.0f} ({100 * gflops / ceiling_gflops:.0f}%)")
    lines.append(f"| {conv_pass}: GFLOP/s (% of ceiling) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--widths", default="0.25,0.5,1", help="CIFAR ResNet-18 width multipliers")
  parser.add_argument("--batch_size", type=int, default=64, help="image pairs per step")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=3, help="steps per timed window and traced")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows; the best is kept")
  parser.add_argument("--conv_backend", default="onednn_bf16", choices=("onednn", "onednn_bf16"),
                      help="the oneDNN convolutions, whose passes the profile tells apart")
  parser.add_argument("--norm_backend", default="native")
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                      help="the maps' dtype between the layers (config.dtype)")
  parser.add_argument("--augment", default="simclr_cifar",
                      help="augmentation preset inside the step (native backend on CPU)")
  parser.add_argument("--matmul_size", type=int, default=2048,
                      help="the ceiling: a [n, n] matmul as a oneDNN 1x1 convolution")
  args = parser.parse_args(argv)
  # Read when JAX starts its CPU backend, which nothing above has done yet.
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), TRACEME_FLAG]))
  host_memory.keep_freed_memory()  # as the trainer does, before JAX's threads
  conv_backend = native.resolve_backend("conv_backend", args.conv_backend)
  norm_backend = native.resolve_backend("norm_backend", args.norm_backend)
  precision = train_step.precision(conv_backend, args.dtype)
  ceiling = lambda: train_step.measure_matmul(args.matmul_size, args.repeats,
                                              models.COMPUTE_DTYPES[precision], onednn=True)
  ceilings = [ceiling()]
  results = {}
  for width in (float(w) for w in args.widths.split(",")):
    results[f"w={width:g}"] = measure(
        train_step.model_config(18, width, cifar_stem=True), batch_size=args.batch_size,
        image_size=args.image_size, augment_preset=args.augment, conv_backend=conv_backend,
        norm_backend=norm_backend, dtype=args.dtype, steps=args.steps, repeats=args.repeats)
    print(f"measured w={width:g}", file=sys.stderr, flush=True)
  ceilings.append(ceiling())
  print(f"Pretraining step by phase (ResNet-18 CIFAR, {args.batch_size} pairs at "
        f"{args.image_size} px, {conv_backend} convs, {norm_backend} BN, {args.dtype} maps, "
        f"augment={args.augment!r}), jax {jax.__version__}, {os.cpu_count()} cores, "
        f"{datetime.date.today().isoformat()}; ms per step (% of the traced step), means over "
        f"{args.steps} traced steps. Ceiling: {precision} "
        f"{args.matmul_size}^3 matmul (oneDNN 1x1 conv) {max(ceilings):.0f} GFLOP/s "
        f"(before, after: {', '.join(f'{c:.0f}' for c in ceilings)}).")
  print()
  print(table(results, max(ceilings)))


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except ValueError as error:
    sys.exit(f"step_phases.py: error: {error}")
