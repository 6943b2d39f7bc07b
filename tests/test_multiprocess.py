"""Two processes on localhost (4 CPU devices each, gloo collectives) train like one process.

`python -m simclr_jax.main --coordinator_address=127.0.0.1:PORT --num_processes=2
--process_id=I` is launched exactly as on a cluster. With `data_shards=2` the global batches do
not depend on the process count (two input streams either way), so 2 x 4 devices and 1 x 8
devices see the same batches and must reach the same parameters. The runs chain layouts:
one process trains steps 1-6; two processes resume its step-2 checkpoint and train 3-6; one
process resumes the two processes' step-4 checkpoint and trains 5-6. All three must end where
the first did. Compiling dominates, so the runs share a persistent compilation cache (process 1
of a multi-process run never writes to it, so the 2-process run compiles once per process).
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from simclr_jax import checkpointing
from simclr_jax import input_pipeline
from simclr_jax import sharding
from simclr_jax import workdir_files
from tests.helpers import relative_distance

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# 2 processes vs 1: the same programme, but gradient shares and BN statistics are summed by gloo
# across processes instead of inside one, in another order. Full-rate LARS steps amplify float32
# rounding in a few near-degenerate BN channels of this tiny network (whose untrusted BN steps the
# official loss scale doubled), so the states differ by more than rounding: measured in global
# relative L2 norm after step 6, 3.5e-4 (params), 5.7e-5 (BN statistics), 8.0e-4 (momentum), and
# losses by up to 7e-5 (at the per-anchor loss scale: 3.9e-6, 8.5e-7, 1.1e-5). The bounds leave a
# ~3x margin; a wrong reduction (a missed or doubled device) moves the loss at step 1 by O(1e-2).
GLOBAL_RTOL = {"params": 1e-3, "batch_stats": 2e-4, "opt_state": 3e-3}
LOSS_RTOL = 3e-4
INDEX_WORKER = """
import json, sys, threading
import numpy as np
from simclr_jax import input_pipeline, sharding
address, process_id, data_dir, output = sys.argv[1:]
sharding.initialize_distributed(coordinator_address=address, num_processes=2,
                                process_id=int(process_id))
batches = input_pipeline.create_train_iterator(
    "synthetic_shapes", data_dir=data_dir, split="train", global_batch_size=32, image_size=32,
    host_crop_views=0, seed=0, mesh=sharding.create_mesh(), data_shards=2)
read = [sorted(int(i) for shard in next(batches)["index"].addressable_shards
               for i in np.asarray(shard.data)) for _ in range(3)]
batches.close()
for thread in threading.enumerate():  # the prefetch thread must end before jax.distributed does
  if thread is not threading.main_thread():
    thread.join(timeout=30)
with open(output, "w") as f:
  json.dump(read, f)
"""


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


@pytest.fixture(scope="module")
def environments(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  base = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  devices = lambda n: dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
  return {1: devices(8), 2: devices(4)}


def launch(command_for_process, num_processes, env):
  """Runs one command per process; returns their outputs, failing with them if any fails."""
  processes = [subprocess.Popen(command_for_process(i), cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(num_processes)]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=600)[0])
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-4000:]
  return outputs


def train_run(workdir, data_dir, num_processes, environments, knn_every_steps=0):
  args = [sys.executable, "-m", "simclr_jax.main", "--config=configs/smoke_pretrain.py",
          f"--workdir={workdir}", f"--config.data_dir={data_dir}",
          f"--config.num_train_steps={STEPS}", "--config.checkpoint_every_steps=2",
          "--config.keep_checkpoints=3", "--config.log_every_steps=1",
          f"--config.evals.knn.enabled={knn_every_steps > 0}",
          f"--config.evals.knn.every_steps={knn_every_steps}",
          "--config.evals.knn.train_examples=128", "--config.evals.knn.eval_examples=64",
          "--config.data_shards=2"]
  if knn_every_steps:  # and at the end the MLP probe, on features with batch statistics
    args += ["--config.evals.mlp.enabled=True", "--config.evals.mlp.train_examples=128",
             "--config.evals.mlp.eval_examples=64", "--config.evals.mlp.hidden_sizes=(16,)",
             "--config.evals.mlp.epochs=2", "--config.evals.mlp.batch_size=32"]
  if num_processes == 1:
    return launch(lambda i: args, 1, environments[1])
  address = f"127.0.0.1:{free_port()}"
  return launch(lambda i: args + [f"--coordinator_address={address}", "--num_processes=2",
                                  f"--process_id={i}"], 2, environments[2])


def state_at(workdir, step):
  return checkpointing.read_state_as_numpy(
      os.path.join(workdir, workdir_files.CHECKPOINT_DIR), step)


def assert_same_run(workdir, reference):
  state, expected = state_at(workdir, STEPS), state_at(reference, STEPS)
  assert int(state["step"]) == STEPS
  np.testing.assert_array_equal(state["rng"], expected["rng"])
  for part, bound in GLOBAL_RTOL.items():
    distance = relative_distance(state[part], expected[part])
    assert distance < bound, f"{part} differ by {distance:.2e} (relative L2) > {bound:.0e}"
  assert_same_losses(workdir, reference)


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, workdir_files.METRICS_FILE)) as f:
    return {record["step"]: record["loss"] for record in map(json.loads, f) if "loss" in record}


def assert_same_losses(workdir, reference):
  mine, expected = losses(workdir), losses(reference)
  for step in mine:
    np.testing.assert_allclose(mine[step], expected[step], rtol=LOSS_RTOL, err_msg=f"step {step}")


def resume_from(source, step, workdir):
  """A workdir holding only `source`'s checkpoint at `step`: a run stopped there."""
  shutil.copytree(os.path.join(source, workdir_files.CHECKPOINT_DIR, str(step)),
                  os.path.join(workdir, workdir_files.CHECKPOINT_DIR, str(step)))
  return workdir


@pytest.fixture(scope="module")
def runs(data_dir, environments, tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  one = str(root / "one_process")
  train_run(one, data_dir, 1, environments)
  two = resume_from(one, 2, str(root / "two_processes"))
  two_outputs = train_run(two, data_dir, 2, environments,
                          knn_every_steps=3)  # k-NN features gathered from both processes
  back = resume_from(two, 4, str(root / "back_to_one_process"))
  train_run(back, data_dir, 1, environments)
  return one, two, back, two_outputs


def test_two_processes_continue_a_run_exactly_as_one_process_does(runs):
  one, two, _, _ = runs
  assert_same_run(two, one)  # restored a 1-process checkpoint, then trained steps 3-6
  with open(os.path.join(two, workdir_files.RESULTS_FILE)) as f:
    results = json.load(f)
  assert (results["num_processes"], results["num_devices"], results["start_step"]) == (2, 8, 2)
  assert np.isfinite(results["knn_top1"])  # features gathered from both processes
  assert np.isfinite(results["mlp_top1"])  # BN statistics over both processes' images


def test_a_checkpoint_of_two_processes_resumes_on_one(runs):
  one, _, back, _ = runs
  assert_same_run(back, one)
  with open(os.path.join(back, workdir_files.RESULTS_FILE)) as f:
    assert json.load(f)["start_step"] == 4


def test_only_process_zero_writes_logs(runs):
  _, two, _, (output_0, output_1) = runs
  with open(os.path.join(two, workdir_files.METRICS_FILE)) as f:
    loss_steps = [record["step"] for record in map(json.loads, f) if "loss" in record]
  assert loss_steps == list(range(3, STEPS + 1))  # once per step, not once per process
  assert len([n for n in os.listdir(two) if n.startswith("events.out.tfevents")]) == 1
  assert "contrastive acc" in output_0 and "contrastive acc" not in output_1  # console lines


def test_each_process_reads_a_disjoint_part_of_the_data(data_dir, environments, tmp_path):
  address = f"127.0.0.1:{free_port()}"
  outputs = [str(tmp_path / f"read_{i}.json") for i in range(2)]
  launch(lambda i: [sys.executable, "-c", INDEX_WORKER, address, str(i), data_dir, outputs[i]],
         2, environments[2])
  read = []
  for path in outputs:
    with open(path) as f:
      read.append(json.load(f))
  half = input_pipeline.get_dataset_info("synthetic_shapes", data_dir=data_dir).split_sizes[
      "train"] // 2
  one_process = input_pipeline.create_train_iterator(
      "synthetic_shapes", data_dir=data_dir, split="train", global_batch_size=32, image_size=32,
      host_crop_views=0, seed=0, mesh=sharding.create_mesh(), data_shards=2)
  for step in range(3):
    first, second = read[0][step], read[1][step]
    assert len(first) == len(second) == 16
    assert max(first) < half <= min(second)  # each process streams its own half of the split
    assert sorted(first + second) == sorted(np.asarray(next(one_process)["index"]).tolist())
