"""Host batches to global device arrays, on a background thread that keeps a few ready."""
import queue
import threading
from typing import Callable, Iterator, Mapping

import jax
import numpy as np


class Prefetcher:
  """Iterates `batches` on a thread, `prefetch_batches` device batches ahead of the consumer."""

  _END = object()

  def __init__(self, batches: Iterator[dict[str, np.ndarray]],
               to_device: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]], *,
               prefetch_batches: int = 2):
    self._queue = queue.Queue(maxsize=prefetch_batches)
    self._stop = threading.Event()
    # The thread must not reference `self`, so dropping the iterator stops it (see __del__).
    self._thread = threading.Thread(
        target=_produce, args=(batches, to_device, self._queue, self._stop), daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    item = self._queue.get()
    if item is Prefetcher._END:
      self._queue.put(item)
      raise StopIteration
    if isinstance(item, BaseException):
      self._queue.put(item)
      raise item
    return item

  def close(self) -> None:
    """Stops the thread and waits for it, so no batch is produced after the caller moves on."""
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join()

  def __del__(self):
    self._stop.set()


def _produce(batches, to_device, output: queue.Queue, stop: threading.Event) -> None:
  def put(item) -> bool:
    while not stop.is_set():
      try:
        output.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  try:
    for batch in batches:
      if not put(to_device(batch)):
        return
    put(Prefetcher._END)
  except Exception as error:  # re-raised in the consumer's thread  # pylint: disable=broad-except
    put(error)


def to_global(sharding: jax.NamedSharding, global_batch_size: int):
  def to_device(batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return {key: jax.make_array_from_process_local_data(
        sharding, value, (global_batch_size,) + value.shape[1:]) for key, value in batch.items()}
  return to_device
