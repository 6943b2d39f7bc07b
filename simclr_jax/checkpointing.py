"""Training checkpoints that survive preemption: Orbax, asynchronous, newest-good-first restore.

A checkpoint holds the whole training state (params, BN statistics, optimizer state, step, PRNG
key) plus a small JSON record. The input position needs no state of its own: the input iterator
is deterministic given (seed, start_step), so the step is the position.

Orbax writes each step into a temporary directory and renames it when complete, so a crash,
Ctrl-C or SIGTERM during a save leaves the previous checkpoints intact; the trainer never saves a
non-finite state. A checkpoint that cannot be read is moved aside (`corrupt-<step>`) with a
warning and the next older one is used.
"""
import os
import time
from typing import Any, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

STATE = "state"
RECORD = "record"
CORRUPT_PREFIX = "corrupt-"


class CheckpointError(ValueError):
  """No checkpoint in the directory can be restored."""


class TrainCheckpointer:
  """Keeps the newest `keep` checkpoints of a run in `directory` (e.g. workdir/checkpoints)."""

  def __init__(self, directory: str, *, keep: int, asynchronous: bool = True):
    if keep < 1:
      raise ValueError(f"keep (keep_checkpoints) must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    self._asynchronous = asynchronous
    self._keep = keep
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._keep, create=True, enable_async_checkpointing=self._asynchronous)
    return ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, RECORD))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def latest_record(self) -> dict | None:
    """The JSON record of the newest checkpoint (cheap: no arrays), or None if there is none.

    Lets a trainer refuse an incompatible workdir before it builds and compiles anything.
    """
    step = self.latest_step()
    if step is None:
      return None
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          RECORD: ocp.args.JsonRestore()}))
    except Exception as e:  # The full restore decides what to do with a broken checkpoint.
      logging.warning("cannot read the record of checkpoint %s/%d (%s: %s)", self.directory,
                      step, type(e).__name__, e)
      return None
    return dict(restored[RECORD])

  def save(self, step: int, state: Any, record: Mapping[str, Any]) -> None:
    """Starts writing `state` at `step` (returns once the arrays are copied off the devices)."""
    self._manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state), RECORD: ocp.args.JsonSave(dict(record))}),
        force=True)

  def restore_latest(self, target: Any) -> tuple[Any, dict] | None:
    """(state, record) of the newest readable checkpoint, laid out like `target`; None if none.

    `target` is a state (or a tree of jax.ShapeDtypeStruct) whose shardings say where the arrays
    go, so a checkpoint written on one device layout restores on any other.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    failures = []
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract), RECORD: ocp.args.JsonRestore()}))
      except Exception as e:  # Orbax raises many types for missing or truncated files.
        failures.append(f"step {step}: {type(e).__name__}: {e}")
        logging.warning("checkpoint %s/%d cannot be restored (%s: %s); moving it aside and "
                        "trying the previous one", self.directory, step, type(e).__name__, e)
        self._move_aside(step)
        continue
      return restored[STATE], dict(restored[RECORD])
    if failures:
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be restored (they were moved aside as "
          f"{CORRUPT_PREFIX}<step>): " + "; ".join(failures))
    return None

  def _move_aside(self, step: int) -> None:
    """Renames an unreadable step so later saves at that step do not collide with it."""
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      source = os.path.join(self.directory, str(step))
      os.rename(source, os.path.join(self.directory,
                                     f"{CORRUPT_PREFIX}{step}-{int(time.time())}"))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
    self._manager.close()
    self._manager = self._open()

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def read_state_as_numpy(directory: str, step: int) -> Any:
  """The state saved at `step` as a tree of NumPy arrays, whatever devices wrote it.

  For inspecting or comparing checkpoints on any machine (a laptop, a test); training resumes
  through `TrainCheckpointer.restore_latest`, which also restores the state's structure.
  """
  path = os.path.join(os.path.abspath(directory), str(step), STATE)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpointed state at {path}")
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=as_numpy)
