r"""Training curves from a run's metrics.jsonl: is the loss falling, are the views being matched?

  python -m simclr_jax.visualize.curves WORKDIR/metrics.jsonl OUT.png
  python -m simclr_jax.visualize.curves --x=minutes A=RUN_A/metrics.jsonl B=RUN_B/metrics.jsonl \
      OUT.png
"""
import argparse
import json
import os
import sys
from typing import Callable, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the non-interactive backend is chosen)
import numpy as np  # noqa: E402

# (panel title, y label, [(metric name, legend label)]); metrics absent from a run are skipped.
PANELS = (
    ("NT-Xent loss", "loss", [("loss", "optimised (official scale: both directions summed)"),
                              ("contrastive_loss_per_anchor", "per anchor (the paper's)")]),
    ("Accuracy", "top-1", [("contrastive_accuracy", "contrastive (view matching)"),
                           ("probe_top1", "online linear probe (train)"),
                           ("knn_top1", "k-NN (held-out)")]),
)


def read_metrics(path: str) -> list[dict]:
  """The records of a JSON-lines file, skipping a truncated last line of a killed run."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def series(records: Iterable[Mapping], name: str) -> tuple[list[int], list[float]]:
  """(steps, values) of metric `name`; a resumed run's repeated steps keep the latest value."""
  by_step = {int(r["step"]): float(r[name]) for r in records if name in r and "step" in r}
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


# The x axes a plot can have: the step, the wall-clock minutes of training (from the progress
# records' `uptime`), or epochs (from the finished run's results.json).
X_AXES = ("step", "minutes", "epochs")


def steps_to_x(metrics_path: str, records: Sequence[Mapping], x: str
               ) -> Callable[[Sequence[int]], np.ndarray]:
  """Maps steps of the run of `metrics_path` to `x` (one of X_AXES)."""
  if x == "step":
    return lambda steps: np.asarray(steps, np.float64)
  if x == "minutes":
    steps, uptimes = series(records, "uptime")
    if not steps:
      raise ValueError(f"{metrics_path} holds no 'uptime' records: plot it against the step")
    # A resumed run's uptime restarts from 0: each segment continues where the last one ended.
    minutes = np.asarray(uptimes) / 60.0
    restarts = np.flatnonzero(np.diff(minutes) < 0)
    for index in restarts:
      minutes[index + 1:] += minutes[index]
    return lambda at: np.interp(at, steps, minutes)
  if x == "epochs":
    from simclr_jax import workdir_files  # pylint: disable=g-import-not-at-top  (imports TF)
    results_path = os.path.join(os.path.dirname(metrics_path), workdir_files.RESULTS_FILE)
    if not os.path.isfile(results_path):
      raise ValueError(f"epochs need the finished run's {results_path}; plot the step or the "
                       "minutes of a run in progress")
    with open(results_path) as f:
      results = json.load(f)
    epochs_per_step = results["epochs"] / results["step"]
    return lambda steps: np.asarray(steps, np.float64) * epochs_per_step
  raise ValueError(f"x={x!r}: expected one of {X_AXES}")


def plot_training_curves(metrics_path: str, output_path: str, *, title: str = "") -> str:
  """Writes a PNG with the loss and the accuracies of one run against the step; returns its
  path."""
  return plot_runs({"": metrics_path}, output_path, title=title)


def plot_runs(runs: Mapping[str, str], output_path: str, *, x: str = "step",
              title: str = "") -> str:
  """Writes a PNG with the loss and the accuracies of `runs` ({label: metrics.jsonl}) against
  `x` (one of X_AXES), one colour per run, one line style per metric; returns its path."""
  read = {}  # every run read and checked before a figure exists
  for run, metrics_path in runs.items():
    records = read_metrics(metrics_path)
    if not any("loss" in r for r in records):
      raise ValueError(f"{metrics_path} holds no 'loss' records to plot")
    read[run] = records, steps_to_x(metrics_path, records, x)
  figure, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4), squeeze=False)
  styles = ("-", "--", ":")
  for color, (run, (records, to_x)) in enumerate(read.items()):
    for axis, (_, _, metrics) in zip(axes[0], PANELS):
      for style, (name, label) in zip(styles, metrics):
        steps, values = series(records, name)
        if steps:
          axis.plot(to_x(steps), values, marker="o" if len(steps) < 20 else None, markersize=3,
                    label=f"{run}: {label}" if run else label,
                    color=f"C{color}" if len(runs) > 1 else None,
                    linestyle=style if len(runs) > 1 else "-")
  for axis, (panel_title, y_label, _) in zip(axes[0], PANELS):
    axis.set_title(panel_title)
    axis.set_xlabel(x)
    axis.set_ylabel(y_label)
    axis.grid(alpha=0.3)
    if y_label == "top-1":
      axis.set_ylim(0, 1)
    if axis.get_legend_handles_labels()[0]:
      axis.legend(loc="best", fontsize=8 if len(runs) < 3 else 6)
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(output_path, dpi=100)
  plt.close(figure)
  return output_path


def main(argv: Sequence[str]) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m simclr_jax.visualize.curves",
      description="Training curves of one run, or of several runs in one figure.")
  parser.add_argument("metrics", nargs="+", metavar="[LABEL=]METRICS.jsonl",
                      help="a run's metrics.jsonl; with several, LABEL names each (default: "
                      "its workdir's name)")
  parser.add_argument("output", metavar="OUT.png")
  parser.add_argument("--x", choices=X_AXES, default="step", help="the x axis (default: step)")
  parser.add_argument("--title", default="")
  args = parser.parse_args(argv)
  runs = {}
  for spec in args.metrics:
    label, _, path = spec.rpartition("=")
    label = label or (os.path.basename(os.path.dirname(os.path.abspath(path)))
                      if len(args.metrics) > 1 else "")
    if label in runs:
      parser.error(f"two runs are labelled {label!r}: name them LABEL=METRICS.jsonl")
    runs[label] = path
  print(plot_runs(runs, args.output, x=args.x, title=args.title))


if __name__ == "__main__":
  main(sys.argv[1:])
