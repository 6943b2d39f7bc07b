r"""Results table and plot of a sweep: one row per run, its swept values and final metrics.

  python experiments/aggregate.py SWEEP_DIR [--sort=probe/top1] [--ascending] [--metric=...]
      [--columns=loss,knn_top1,probe/top1] [--over=seed] [--out=DIR]

Reads `SWEEP_DIR/sweep.json` (written by experiments/sweep.py: the runs and their swept values)
and each run's `results.json` (and `probe/results.json`, whose metrics get a `probe/` prefix).
Without a manifest every subdirectory holding a results.json is a run. Writes `results.md`
(markdown table), `results.csv` (full precision) and `results.png` (the metric against each
swept value, one line per combination of the other swept values) into --out (default SWEEP_DIR).
Runs that have not finished appear with their status and empty metrics. `--over=KEY` (e.g.
seed) groups the runs that differ only in KEY: the markdown table and the plot then show each
group's mean, its spread (min-max) and the number of finished runs; the CSV keeps every run.
"""
import argparse
import csv
import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

MANIFEST_FILE = "sweep.json"
RESULTS_FILE = "results.json"
PROBE_SUBDIR = "probe"
PROBE_PREFIX = "probe/"
RANGE_SUFFIX = ":range"  # a grouped row's (min, max) of a metric


def _numeric(results: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in results.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _read_results(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      results = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); delete it to re-run that run") from e
  if not isinstance(results, dict):
    raise ValueError(f"{path} holds {type(results).__name__}, expected a flat JSON object")
  return results


def load_manifest(root: str) -> dict[str, Any]:
  """The sweep's manifest, or one built from the subdirectories that hold results."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"sweep directory {root!r} does not exist")
  path = os.path.join(root, MANIFEST_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  names = sorted(d for d in os.listdir(root)
                 if os.path.exists(os.path.join(root, d, RESULTS_FILE)))
  if not names:
    raise FileNotFoundError(f"{root!r} has no {MANIFEST_FILE} and no subdirectory with a "
                            f"{RESULTS_FILE}: is it a sweep directory?")
  return {"grid": {}, "probe_config": "", "runs": [{"name": n, "values": {}} for n in names]}


def collect_rows(root: str, manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
  """One dict per run: 'run', 'status', the swept values (by key) and the numeric metrics."""
  rows = []
  wants_probe = bool(manifest.get("probe_config"))
  for run in manifest["runs"]:
    run_dir = os.path.join(root, run["name"])
    # JSON turned tuple values (e.g. per-view probabilities) into lists; tuples stay hashable.
    row = {"run": run["name"], **{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in run["values"].items()}}
    results = _read_results(os.path.join(run_dir, RESULTS_FILE))
    probe = _read_results(os.path.join(run_dir, PROBE_SUBDIR, RESULTS_FILE))
    if results is not None:
      row.update(_numeric(results))
    if probe is not None:
      row.update({PROBE_PREFIX + k: v for k, v in _numeric(probe).items()})
    if results is None:
      row["status"] = "unfinished" if os.path.isdir(run_dir) else "not started"
    elif wants_probe and probe is None:
      row["status"] = "probe missing"
    else:
      row["status"] = "done"
    rows.append(row)
  return rows


def metric_names(rows: Sequence[Mapping[str, Any]], swept: Sequence[str]) -> list[str]:
  """Metric columns in first-seen order, the run's own before the probe's."""
  names = {}
  for row in rows:
    for key in row:
      if key not in ("run", "status") and key not in swept:
        names[key] = None
  return sorted(names, key=lambda k: k.startswith(PROBE_PREFIX))


def sort_rows(rows: list[dict[str, Any]], metric: str, metrics: Sequence[str],
              ascending: bool) -> list[dict[str, Any]]:
  """Sorted by metric (best first unless ascending); runs without it go last."""
  if metric not in metrics:
    raise ValueError(f"cannot sort by {metric!r}: the runs report {list(metrics)}")
  present = [r for r in rows if metric in r]
  missing = [r for r in rows if metric not in r]
  return sorted(present, key=lambda r: r[metric], reverse=not ascending) + missing


def default_metric(metrics: Sequence[str]) -> str | None:
  """The probe's top-1 if there is one, else the run's own top-1, else the first metric."""
  preferences = (lambda m: m.startswith(PROBE_PREFIX) and "top1" in m, lambda m: "top1" in m,
                 lambda m: "accuracy" in m, lambda m: True)
  for wanted in preferences:
    for name in metrics:
      if wanted(name):
        return name
  return None


def group_over(rows: Sequence[Mapping[str, Any]], swept: Sequence[str], over: str,
               metrics: Sequence[str]) -> list[dict[str, Any]]:
  """One row per combination of the swept keys other than `over`, in first-seen order: each
  metric's mean over the group's finished runs, its (min, max) as `metric:range`, and `n`."""
  if over not in swept:
    raise ValueError(f"cannot group over {over!r}: the sweep's swept keys are {list(swept)}")
  keys = [k for k in swept if k != over]
  groups = {}
  for row in rows:
    groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
  grouped = []
  for values, members in groups.items():
    done = [r for r in members if r["status"] == "done"]
    row = {"run": ", ".join(f"{k}={_format(v)}" for k, v in zip(keys, values)) or "all",
           **dict(zip(keys, values)), "n": len(done),
           "status": "done" if len(done) == len(members) else f"{len(done)} of {len(members)} done"}
    for metric in metrics:
      found = [r[metric] for r in done if metric in r]
      if found:
        row[metric] = sum(found) / len(found)
        row[metric + RANGE_SUFFIX] = (min(found), max(found))
    grouped.append(row)
  return grouped


def _format(value: Any) -> str:
  if isinstance(value, float):
    if value == 0 or math.isnan(value) or 1e-3 <= abs(value) < 1e5:
      return f"{value:.4g}"
    return f"{value:.3e}"
  return "" if value is None else str(value)


def _cell(row: Mapping[str, Any], column: str) -> str:
  """A value, or a group's `mean (min-max)` when it has a range of distinct values."""
  low, high = row.get(column + RANGE_SUFFIX, (None, None))
  if low is not None and low != high:
    return f"{_format(row[column])} ({_format(low)}-{_format(high)})"
  return _format(row.get(column))


def write_markdown(path: str, rows, columns, manifest, sort_note: str) -> None:
  lines = [f"# Sweep results ({len(rows)} runs)", ""]
  if manifest.get("config"):
    lines.append(f"Recipe: `{manifest['config']}`; fixed overrides: "
                 f"`{json.dumps(manifest.get('fixed', {}))}`.")
  if manifest.get("probe_config"):
    lines.append(f"Probe: `{manifest['probe_config']}` with "
                 f"`{json.dumps(manifest.get('probe_fixed', {}))}` (metrics prefixed `probe/`).")
  lines += [sort_note, "", "| " + " | ".join(columns) + " |",
            "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_cell(row, c) for c in columns) + " |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def write_csv(path: str, rows, columns) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def write_plot(path: str, rows, swept: Sequence[str], metric: str) -> bool:
  """metric against each swept key; one line per combination of the other keys. False if no data."""
  rows = [r for r in rows if metric in r]
  if not rows:
    return False
  keys = list(swept) or ["run"]
  figure, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
  for axis, key in zip(axes[0], keys):
    values = list(dict.fromkeys(r[key] for r in rows if key in r))
    numeric = all(_is_number(v) for v in values)
    position = (lambda v: v) if numeric else (lambda v: values.index(v))
    others = [k for k in keys if k != key]
    series = {}
    for row in rows:
      label = ", ".join(f"{k}={_format(row.get(k))}" for k in others)
      low, high = row.get(metric + RANGE_SUFFIX, (row[metric], row[metric]))
      series.setdefault(label, []).append((position(row[key]), row[metric], low, high))
    for label, points in sorted(series.items()):
      points.sort()
      axis.errorbar([p[0] for p in points], [p[1] for p in points],
                    yerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]],
                    marker="o", capsize=3, label=label or None)
    if numeric and min(values) > 0 and max(values) / min(values) >= 10:
      axis.set_xscale("log")
    if not numeric:
      axis.set_xticks(range(len(values)), [_format(v) for v in values],
                      rotation=30 if len(values) > 3 else 0, ha="right" if len(values) > 3 else
                      "center")
    axis.set_xlabel(key)
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    if others and 1 < len(series) <= 10:
      axis.legend(fontsize=7)
  figure.suptitle(f"{metric} per swept value")
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return True


def aggregate(root: str, *, out: str | None = None, sort: str | None = None,
              ascending: bool = False, metric: str | None = None,
              columns: Sequence[str] = (), over: str | None = None) -> dict[str, str]:
  """Writes results.md/.csv/.png for the sweep in root; returns the paths written.

  `columns` limits the markdown table's metrics (the CSV keeps them all); `over` groups the
  table and plot over that swept key (see `group_over`).
  """
  manifest = load_manifest(root)
  swept = list(manifest.get("grid", {}))
  rows = collect_rows(root, manifest)
  metrics = metric_names(rows, swept)
  if sort:
    rows = sort_rows(rows, sort, metrics, ascending)
  all_rows, all_swept = rows, swept
  if over:
    rows = group_over(rows, swept, over, metrics)
    swept = [k for k in swept if k != over]
    if sort:
      rows = sort_rows(rows, sort, metrics, ascending)
  if sort:
    sort_note = f"Sorted by `{sort}`, {'lowest' if ascending else 'highest'} first."
  else:
    sort_note = "In grid order."
  plot_metric = metric or sort or default_metric(metrics)
  if metric and metric not in metrics:
    raise ValueError(f"cannot plot {metric!r}: the runs report {list(metrics)}")
  unknown = [c for c in columns if c not in metrics]
  if unknown:
    raise ValueError(f"unknown --columns {unknown}: the runs report {list(metrics)}")
  out = out or root
  os.makedirs(out, exist_ok=True)
  paths = {"markdown": os.path.join(out, "results.md"), "csv": os.path.join(out, "results.csv")}
  write_markdown(paths["markdown"], rows,
                 ["run", *swept, *(["n"] if over else []), *(columns or metrics), "status"],
                 manifest, sort_note + (f" Mean (min-max) over `{over}`." if over else ""))
  write_csv(paths["csv"], all_rows, ["run", *all_swept, *metrics, "status"])
  if plot_metric and write_plot(os.path.join(out, "results.png"), rows, swept, plot_metric):
    paths["plot"] = os.path.join(out, "results.png")
  return paths


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("root", help="sweep directory (holding sweep.json and one dir per run)")
  parser.add_argument("--sort", default="", help="metric to sort by, highest first")
  parser.add_argument("--ascending", action="store_true", help="lowest first (losses)")
  parser.add_argument("--metric", default="",
                      help="metric to plot (default: --sort, else the probe's/the run's top-1)")
  parser.add_argument("--columns", default="",
                      help="comma-separated metrics for the markdown table (default: all)")
  parser.add_argument("--over", default="",
                      help="swept key (e.g. seed) to average over: mean (min-max) per group")
  parser.add_argument("--out", default="", help="output directory (default: the sweep directory)")
  args = parser.parse_args(argv)
  paths = aggregate(args.root, out=args.out or None, sort=args.sort or None,
                    ascending=args.ascending, metric=args.metric or None,
                    columns=[c for c in args.columns.split(",") if c], over=args.over or None)
  with open(paths["markdown"]) as f:
    print(f.read())
  print("wrote " + ", ".join(paths.values()))
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main(sys.argv[1:]))
  except (ValueError, FileNotFoundError) as error:
    sys.exit(f"aggregate.py: error: {error}")
