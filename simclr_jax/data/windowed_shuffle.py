"""Shuffled epochs that start at any stream position after reading one window: for large shards.

A shard too large to cache cannot replay tf.data's shuffle cheaply: resuming at an epoch's end
re-reads the whole epoch. Here the order is a function of (seed, shard, epoch) computed in NumPy,
so the example at any position is known without reading the ones before it. Epoch `e` of a shard
whose members are the sorted split indices m[0..n):
  1. blocks: m cut into runs of `block_size` consecutive members (the last may be shorter);
  2. the blocks in the order of a permutation drawn from (seed, shard, e);
  3. windows: consecutive groups of window_size // block_size blocks in that order;
  4. each window's members in the order of a permutation drawn from (seed, shard, e, window).
Resuming (or starting) reads the window holding the position: about `window_size` records,
whatever the position. Why blocks: a TFRecord file is read sequentially, so a block costs one skip
within one file (record headers only) then sequential reads; sources with random access (image
folders) use blocks of one example, which makes each epoch a uniform permutation.
Why not Grain: its index-based global shuffle needs random access (ArrayRecord); prepared TFDS
datasets here are TFRecord, and blocks keep reads sequential on GCS too.
Why Philox's raw stream and an argsort rather than Generator.permutation: NumPy keeps bit-generator
streams fixed across versions, not the algorithms of Generator methods, so a run resumed after an
upgrade keeps its order.
"""
import itertools
import math
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

BLOCKS_PER_WINDOW = 128  # how many places of the shard each window mixes (sequential sources)
_BLOCK_ORDER = 0
_WINDOW_ORDER = 1


def permutation(size: int, *key: int) -> np.ndarray:
  """A permutation of range(size) determined by the integers `key`."""
  bits = np.random.Philox(np.random.SeedSequence([int(value) % 2**64 for value in key]))
  return np.argsort(bits.random_raw(size), kind="stable")


def windows(members: np.ndarray, *, window_size: int, block_size: int, seed: int, shard: int,
            start_position: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """(epoch, [n, 2] split-index ranges to read, split indices in stream order) per window.

  Starts with the window holding stream position `start_position` (its order from there on).
  """
  num_blocks = math.ceil(members.size / block_size)
  blocks_per_window = max(1, window_size // block_size)
  block_starts = np.arange(num_blocks) * block_size
  block_stops = np.minimum(block_starts + block_size, members.size)
  first_epoch, offset = divmod(start_position, members.size)
  for epoch in itertools.count(first_epoch):
    block_order = permutation(num_blocks, seed, shard, epoch, _BLOCK_ORDER)
    for number, first in enumerate(range(0, num_blocks, blocks_per_window)):
      blocks = np.sort(block_order[first:first + blocks_per_window])
      size = int(np.sum(block_stops[blocks] - block_starts[blocks]))
      if offset >= size:
        offset -= size
        continue
      positions = (block_starts[blocks, None] + np.arange(block_size)).ravel()
      window_members = members[positions[positions < members.size]]
      order = window_members[permutation(size, seed, shard, epoch, _WINDOW_ORDER, number)]
      ranges = np.stack([members[block_starts[blocks]], members[block_stops[blocks] - 1] + 1], 1)
      yield epoch, ranges, order[offset:]
      offset = 0


def stream(read_ranges: Callable[[tf.Tensor], tf.data.Dataset], members: np.ndarray, *,
           window_size: int, block_size: int, seed: int, shard: int,
           start_position: int) -> tf.data.Dataset:
  """Undecoded records plus 'epoch', endlessly, from stream position `start_position` on.

  `read_ranges` maps int64 [n, 2] split-index ranges [start, stop) to their records
  {'index', 'label', 'image'} (any order). The next window is read while one is consumed.
  """
  plans = tf.data.Dataset.from_generator(
      lambda: windows(members, window_size=window_size, block_size=block_size, seed=seed,
                      shard=shard, start_position=start_position),
      output_signature=(tf.TensorSpec([], tf.int64), tf.TensorSpec([None, 2], tf.int64),
                        tf.TensorSpec([None], tf.int64)))
  largest_window = max(1, window_size // block_size) * block_size
  span_start = int(members[0])
  is_member = np.zeros(int(members[-1]) + 1 - span_start, bool)
  is_member[members - span_start] = True

  def read_window(epoch, ranges, order):
    records = read_ranges(ranges)
    if not is_member.all():  # a subset: blocks span non-members too
      records = records.filter(lambda record: tf.gather(is_member, record["index"] - span_start))
    window = records.batch(largest_window).get_single_element()
    by_index = tf.argsort(window["index"])
    slots = tf.gather(by_index, tf.searchsorted(tf.gather(window["index"], by_index), order))
    complete = tf.debugging.assert_equal(
        tf.gather(window["index"], slots), order,
        message="the files hold fewer records than the dataset's metadata says")
    with tf.control_dependencies([complete]):
      return {**window, "slot": tf.identity(slots), "epoch": epoch}

  def emit(window):
    return tf.data.Dataset.from_tensor_slices(window["slot"]).map(lambda slot: {
        "index": window["index"][slot], "label": window["label"][slot],
        "image": window["image"][slot], "epoch": window["epoch"]})

  return plans.map(read_window).prefetch(1).flat_map(emit)
