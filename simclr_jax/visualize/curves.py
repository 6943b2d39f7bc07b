"""Training curves from a run's metrics.jsonl: is the loss falling, are the views being matched?

  python -m simclr_jax.visualize.curves WORKDIR/metrics.jsonl OUT.png
"""
import json
import sys
from typing import Iterable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the non-interactive backend is chosen)

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


def plot_training_curves(metrics_path: str, output_path: str, *, title: str = "") -> str:
  """Writes a PNG with the loss and the accuracies against the step; returns its path."""
  records = read_metrics(metrics_path)
  if not any("loss" in r for r in records):
    raise ValueError(f"{metrics_path} holds no 'loss' records to plot")
  figure, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4), squeeze=False)
  for axis, (panel_title, y_label, metrics) in zip(axes[0], PANELS):
    for name, label in metrics:
      steps, values = series(records, name)
      if steps:
        axis.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3,
                  label=label)
    axis.set_title(panel_title)
    axis.set_xlabel("step")
    axis.set_ylabel(y_label)
    axis.grid(alpha=0.3)
    if y_label == "top-1":
      axis.set_ylim(0, 1)
    axis.legend(loc="best", fontsize=8)
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(output_path, dpi=100)
  plt.close(figure)
  return output_path


if __name__ == "__main__":
  if len(sys.argv) != 3:
    raise SystemExit("usage: python -m simclr_jax.visualize.curves METRICS.jsonl OUT.png")
  print(plot_training_curves(sys.argv[1], sys.argv[2]))
