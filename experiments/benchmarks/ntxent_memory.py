r"""NT-Xent memory and time against the global batch, on 1 device and sharded over 8 (fake) devices.

  python experiments/benchmarks/ntxent_memory.py [--embeddings=1024,4096,16384,65536]
      [--devices=1,8] [--max_timed_embeddings=16384] [--dim=128]

For each global number of embeddings E (= 2 views x N images) and device count d, compiles the
loss and its gradient w.r.t. the embeddings as the trainer runs them (`jax.shard_map` over a
`data` axis, `nt_xent(..., axis_name='data')`) and reads the compiled program's per-device
temporary memory from XLA's memory analysis. The local rows are scored against all-gathered
columns, so the temporaries should grow as E^2/d per device: the `vs 1 device` column should be
about 1/d, and `temp / (E^2/d x 4 B)` (the number of float32 [E/d, E] matrices live at once)
should stay flat as E grows. Compiling needs no memory for the data, so every size is analysed;
only sizes up to --max_timed_embeddings are also run and timed (the 8 fake devices share this
machine's cores, so their time is the total work, not a parallel speed-up).
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402  (jax must be imported after XLA_FLAGS is set)
import datetime  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from simclr_jax import losses  # noqa: E402

MIB = 2**20


def build_loss_and_grad(mesh: jax.sharding.Mesh, temperature: float):
  """jit(shard_map(value_and_grad(nt_xent))) over the mesh's data axis, as in a training step."""

  def loss(z1, z2):
    return losses.nt_xent(z1, z2, temperature=temperature, axis_name="data")[0]

  batch = jax.P("data")
  return jax.jit(jax.shard_map(jax.value_and_grad(loss, argnums=(0, 1)), mesh=mesh,
                               in_specs=(batch, batch), out_specs=(jax.P(), (batch, batch))))


def measure(num_embeddings: int, num_devices: int, dim: int, timed: bool, repeats: int) -> dict:
  """Compiles (and optionally runs) the loss for one size; per-device memory in bytes."""
  if num_embeddings % (2 * num_devices):
    raise ValueError(f"{num_embeddings} embeddings do not split into 2 views over "
                     f"{num_devices} devices")
  mesh = jax.make_mesh((num_devices,), ("data",), devices=jax.devices()[:num_devices])
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  pairs = num_embeddings // 2
  spec = jax.ShapeDtypeStruct((pairs, dim), jnp.float32, sharding=sharding)
  step = build_loss_and_grad(mesh, temperature=0.1)
  compiled = step.lower(spec, spec).compile()
  memory = compiled.memory_analysis()
  row = {"embeddings": num_embeddings, "devices": num_devices,
         "temp_bytes": memory.temp_size_in_bytes,
         "io_bytes": memory.argument_size_in_bytes + memory.output_size_in_bytes,
         "seconds": None}
  if timed:
    rng = np.random.default_rng(0)
    z1, z2 = (jax.device_put(rng.standard_normal((pairs, dim), np.float32), sharding)
              for _ in range(2))
    jax.block_until_ready(compiled(z1, z2))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(z1, z2))
      times.append(time.perf_counter() - start)
    row["seconds"] = float(np.median(times))
  return row


def table(rows: list[dict]) -> str:
  """Markdown: per-device temporaries, their E^2/d multiple, and ratios to 1 device."""
  single = {r["embeddings"]: r for r in rows if r["devices"] == 1}
  lines = ["| embeddings E | devices d | temp MiB / device | temp / (E²/d × 4 B) | "
           "temp vs 1 device | time ms | time vs 1 device |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    e, d = r["embeddings"], r["devices"]
    quadratic = r["temp_bytes"] / (e * e / d * 4)
    base = single.get(e)
    mem_ratio = f"{r['temp_bytes'] / base['temp_bytes']:.3f}" if base else "n/a"
    time_ms = f"{r['seconds'] * 1e3:.1f}" if r["seconds"] is not None else "not run"
    time_ratio = (f"{r['seconds'] / base['seconds']:.2f}"
                  if base and base["seconds"] and r["seconds"] is not None else "n/a")
    lines.append(f"| {e:,} | {d} | {r['temp_bytes'] / MIB:,.1f} | {quadratic:.2f} | "
                 f"{mem_ratio} | {time_ms} | {time_ratio} |")
  return "\n".join(lines)


def main(argv) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--embeddings", default="1024,4096,16384,65536",
                      help="global embedding counts E (2 per image)")
  parser.add_argument("--devices", default="1,8", help="device counts (at most 8)")
  parser.add_argument("--max_timed_embeddings", type=int, default=16384,
                      help="run and time only sizes up to this (bigger ones are compiled only)")
  parser.add_argument("--dim", type=int, default=128, help="embedding width (projection_dim)")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  sizes = [int(v) for v in args.embeddings.split(",")]
  device_counts = [int(v) for v in args.devices.split(",")]
  if max(device_counts) > jax.device_count():
    raise ValueError(f"--devices={args.devices} but only {jax.device_count()} devices exist")
  rows = []
  for e in sizes:
    for d in device_counts:
      rows.append(measure(e, d, args.dim, timed=e <= args.max_timed_embeddings,
                          repeats=args.repeats))
      print(f"measured E={e} d={d}", file=sys.stderr, flush=True)
  print(f"NT-Xent forward+backward, float32, dim {args.dim}, jax {jax.__version__}, "
        f"{datetime.date.today().isoformat()}\n")
  print(table(rows))


if __name__ == "__main__":
  main(sys.argv[1:])
