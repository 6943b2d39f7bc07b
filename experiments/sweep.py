r"""Config sweeps: a grid over a recipe, one workdir per run, run here or launched elsewhere.

  python experiments/sweep.py --config=configs/cifar10_pretrain.py:cpu \
      --grid='temperature=0.1,0.2,0.5' --grid='optimizer.base_learning_rate=0.5,1.0' \
      --root=/tmp/sweep_t_lr [--set num_epochs=5 ...] \
      [--probe_config=configs/cifar10_linear_probe.py:cpu --probe_set key=value ...] \
      --run | --print_commands

Every run gets `ROOT/<name>` where the name spells its swept values (`temperature=0.1,...`).
An ablation is not a cartesian grid: `--case='NAME:key=value;key=value'` (repeatable) names one
set of overrides, and the cases are crossed with the grid (`--case=recipe --case='no_blur:
augment.blur.p=0.0' --grid=seed=0,1` runs both cases with both seeds as `case=no_blur,seed=1`).
`--run` trains them one after another through `python -m simclr_jax.main`: a run whose workdir
holds `results.json` is skipped and an interrupted one resumes from its own checkpoints (the
trainer resumes from its workdir), so re-running the same command finishes a sweep. With
`--probe_config`, each finished pretraining is followed by a linear probe of its export in
`ROOT/<name>/probe`. `--print_commands` prints the launch commands instead. Either way the sweep
writes `ROOT/sweep.json` (the manifest `experiments/aggregate.py` reads for the swept values) and
`ROOT/commands.sh` (one line per run, for a job array or a TPU pod launcher). Every key and value
is checked against the recipe with the trainer's own flag parser before anything starts, so a
misspelt key fails in a second rather than after the first run.
"""
import argparse
import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Callable, Mapping, Sequence

from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

MANIFEST_FILE = "sweep.json"
COMMANDS_FILE = "commands.sh"
RESULTS_FILE = "results.json"
PROBE_SUBDIR = "probe"
LOG_FILE = "sweep.log"
ENTRY_MODULE = "simclr_jax.main"
PORTABLE_PYTHON = "${PYTHON:-python}"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Pretraining fields a probe of the export must agree on: the probe recipe's config.model must
# describe the exported network (the probe refuses a mismatch), and data_dir is where TFDS data is.
FORWARDED_TO_PROBE = ("model", "data_dir")
CASE_KEY = "case"  # the swept value naming a run's --case


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the grid: its directory name, typed swept values and every override it passes.

  `forwarded` holds the resolved pretraining fields a probe must share (FORWARDED_TO_PROBE),
  flattened to dotted keys.
  """
  name: str
  values: Mapping[str, Any]
  overrides: Mapping[str, str]
  forwarded: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def split_values(text: str) -> list[str]:
  """Splits `a,b,c` on commas outside brackets and quotes, so `(1,2),(3,4)` gives two tuples."""
  values, current, depth, quote = [], [], 0, ""
  for char in text:
    if quote:
      quote = "" if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      values.append("".join(current).strip())
      current = []
      continue
    current.append(char)
  values.append("".join(current).strip())
  if quote or depth != 0 or any(not v for v in values):
    raise ValueError(f"cannot split {text!r} into values: unbalanced brackets/quotes or an empty "
                     "value (write values as `key=v1,v2,v3`)")
  return values


def _split_assignment(spec: str, flag_name: str) -> tuple[str, str]:
  key, sep, value = spec.partition("=")
  key = key.strip()
  if not sep or not key or not value.strip():
    raise ValueError(f"--{flag_name}={spec!r} is not of the form key=value (e.g. temperature=0.5)")
  return key, value.strip()


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
  """`['temperature=0.1,0.5', ...]` -> `{'temperature': ['0.1', '0.5'], ...}` in the given order."""
  grid = {}
  for spec in specs:
    key, text = _split_assignment(spec, "grid")
    if key in grid:
      raise ValueError(f"--grid names {key!r} twice; list all its values in one --grid")
    values = split_values(text)
    if len(set(values)) != len(values):
      raise ValueError(f"--grid={spec!r} repeats a value")
    grid[key] = values
  return grid


def parse_assignments(specs: Sequence[str], flag_name: str = "set") -> dict[str, str]:
  """`['num_epochs=5', ...]` -> `{'num_epochs': '5', ...}`; a key given twice is an error."""
  assignments = {}
  for spec in specs:
    key, value = _split_assignment(spec, flag_name)
    if key in assignments:
      raise ValueError(f"--{flag_name} gives {key!r} twice")
    assignments[key] = value
  return assignments


def parse_cases(specs: Sequence[str]) -> dict[str, dict[str, str]]:
  """`['recipe', 'no_blur:augment.blur.p=0.0;seed=1']` -> {'recipe': {}, 'no_blur': {...}}.

  A case is a name (letters, digits, . _ + -) and optional `;`-separated overrides after `:`.
  """
  cases = {}
  for spec in specs:
    name, _, text = spec.partition(":")
    name = name.strip()
    if not name or _safe(name) != name:
      raise ValueError(f"--case={spec!r}: a case needs a name of letters, digits or . _ + - "
                       "before its ':' (e.g. --case='no_blur:augment.blur.p=0.0')")
    if name in cases:
      raise ValueError(f"--case names {name!r} twice")
    cases[name] = parse_assignments([a for a in text.split(";") if a.strip()], f"case={name}")
  return cases


def load_config(config_arg: str, overrides: Mapping[str, str]):
  """The config exactly as `simclr_jax.main` would see it with `--config.key=value` overrides.

  Uses ml_collections' own flag parsing, so an unknown key or a value of the wrong type fails here
  with the message the trainer would give.
  """
  config_file = config_arg.split(":", 1)[0]
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"config file {config_file!r} (from --config={config_arg}) does not "
                            f"exist relative to {os.getcwd()!r}; run from the repository root")
  argv = ["sweep", f"--config={config_arg}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  try:
    flag_values(argv)
    return flag_values.config
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = e.args[0] if e.args else e
    if isinstance(message, KeyError):  # ConfigDict's "unknown field" error wraps a KeyError.
      message = message.args[0]
    text = str(message).strip()
    if "Traceback" in text:  # config_flags appends get_config's traceback: keep its last line.
      text = text.splitlines()[-1]
    raise ValueError(f"--config={config_arg} with overrides {dict(overrides)}: "
                     f"{text.replace(chr(10), ' ')}") from e


def run_names(grid: Mapping[str, Sequence[str]]) -> dict[str, str]:
  """Shortest dotted suffix of each key that is unique in the grid: `base_learning_rate`, ..."""
  labels = {}
  for key in grid:
    parts = key.split(".")
    for start in range(len(parts) - 1, -1, -1):
      label = ".".join(parts[start:])
      others = [k for k in grid if k != key]
      if not any(k == label or k.endswith("." + label) for k in others):
        break
    labels[key] = label
  return labels


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if hasattr(value, "items"):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def _safe(value: str) -> str:
  return re.sub(r"[^A-Za-z0-9._+-]+", "-", value).strip("-") or "empty"


def plan_sweep(config_arg: str, grid: Mapping[str, Sequence[str]],
               fixed: Mapping[str, str],
               cases: Mapping[str, Mapping[str, str]] | None = None) -> list[Run]:
  """Every (case x) grid point as a Run, each validated against the recipe before any run starts.

  With `cases`, the runs' swept values start with `case` (the case's name).
  """
  clashes = sorted(set(grid) & set(fixed))
  if clashes:
    raise ValueError(f"{clashes} are both swept (--grid) and fixed (--set); keep one")
  if CASE_KEY in grid:
    raise ValueError(f"{CASE_KEY!r} names the --case of a run; it cannot be a --grid key")
  for case, overrides in (cases or {}).items():
    clashes = sorted(set(overrides) & (set(grid) | set(fixed)))
    if clashes:
      raise ValueError(f"--case={case} sets {clashes}, which --grid or --set also gives; keep one")
  labels = run_names(grid)
  runs = []
  for case, combination in itertools.product(cases or [None], itertools.product(*grid.values())):
    swept = dict(zip(grid, combination))
    case_overrides = dict(cases[case]) if case else {}
    config = load_config(config_arg, {**fixed, **case_overrides, **swept})
    name = ",".join(([f"{CASE_KEY}={case}"] if case else []) +
                    [f"{labels[k]}={_safe(v)}" for k, v in swept.items()]) or "default"
    values = ({CASE_KEY: case} if case else {}) | {
        k: config_path.get_value(k, config) for k in swept}
    runs.append(Run(name=name, values=values, overrides={**fixed, **case_overrides, **swept},
                    forwarded=_flatten({k: config[k] for k in FORWARDED_TO_PROBE if k in config})))
  names = [run.name for run in runs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"different grid values give the same run directory {duplicates}; "
                     "use values that differ in letters, digits or . _ + -")
  return runs


@dataclasses.dataclass(frozen=True)
class Stage:
  """A job every run goes through (pretrain, then optionally probe): its recipe, where it writes
  and the overrides it passes."""
  name: str
  config_arg: str
  workdir: Callable[[Run], str]
  overrides: Callable[[Run], dict[str, str]]

  def args(self, run: Run) -> list[str]:
    """Arguments of `python -m simclr_jax.main` for this stage of `run`."""
    return ([f"--config={self.config_arg}", f"--workdir={self.workdir(run)}"] +
            [f"--config.{k}={v}" for k, v in self.overrides(run).items()])

  def validate(self, run: Run) -> None:
    load_config(self.config_arg, self.overrides(run))


def probe_overrides(run: Run, probe_defaults, probe_fixed: Mapping[str, str],
                    export_dir: str) -> dict[str, str]:
  """The probe's overrides: its --probe_set values, init_from, and the run's model/data_dir.

  A forwarded field is passed only where the probe recipe has it, differs, and --probe_set does
  not set it (an explicit --probe_set wins).
  """
  forwarded = {}
  for key, value in run.forwarded.items():
    try:
      default = config_path.get_value(key, probe_defaults)
    except (AttributeError, KeyError):
      continue
    if key not in probe_fixed and default != value:
      forwarded[key] = str(value)
  return {**forwarded, **probe_fixed, "init_from": export_dir}


def build_stages(config_arg: str, root: str, probe_config_arg: str = "",
                 probe_fixed: Mapping[str, str] | None = None) -> list[Stage]:
  """Pretraining in ROOT/<run>; with a probe recipe, a probe of ROOT/<run>/export in .../probe."""
  pretrain_dir = lambda run: os.path.join(root, run.name)
  stages = [Stage("pretrain", config_arg, pretrain_dir, lambda run: dict(run.overrides))]
  if probe_config_arg:
    probe_fixed = dict(probe_fixed or {})
    if "init_from" in probe_fixed:
      raise ValueError("--probe_set init_from=... is set by the sweep to each run's export")
    probe_defaults = load_config(probe_config_arg, {**probe_fixed, "init_from": "export"})
    probe_dir = lambda run: os.path.join(pretrain_dir(run), PROBE_SUBDIR)
    stages.append(Stage("probe", probe_config_arg, probe_dir, lambda run: probe_overrides(
        run, probe_defaults, probe_fixed, os.path.join(pretrain_dir(run), "export"))))
  return stages


def shell_line(stages: Sequence[Stage], run: Run) -> str:
  """One shell line per run: its stages joined with && so a probe never runs on a failed run."""
  return " && ".join(
      " ".join([PORTABLE_PYTHON, "-m", ENTRY_MODULE] + [shlex.quote(a) for a in stage.args(run)])
      for stage in stages)


def _manifest(config_arg, grid, fixed, probe_config_arg, probe_fixed, runs, cases=None) -> dict:
  """The sweep's record; a --case sweep lists its case names first in `grid` (as `case`) and
  their overrides in `cases`."""
  return {
      "config": config_arg, "fixed": dict(fixed), "cases": dict(cases or {}),
      "grid": ({CASE_KEY: list(cases)} if cases else {}) | dict(grid),
      "probe_config": probe_config_arg or "", "probe_fixed": dict(probe_fixed),
      "probe_subdir": PROBE_SUBDIR, "results_file": RESULTS_FILE,
      "runs": [{"name": r.name, "values": dict(r.values), "overrides": dict(r.overrides)}
               for r in runs],
  }


def merge_with_existing(root: str, manifest: dict) -> dict:
  """Extends the manifest already in ROOT (more values of the same keys, or a probe stage added to
  a sweep that had none); refuses a different recipe, fixed overrides or probe."""
  path = os.path.join(root, MANIFEST_FILE)
  if not os.path.exists(path):
    return manifest
  with open(path) as f:
    existing = json.load(f)
  adds_probe = not existing.get("probe_config")  # a probe stage may be added to a sweep later
  for field in ("config", "fixed") + (() if adds_probe else ("probe_config", "probe_fixed")):
    if existing.get(field) != manifest[field]:
      raise ValueError(f"{root} already holds a sweep with {field}={existing.get(field)!r}, not "
                       f"{manifest[field]!r}; use another --root")
  if list(existing["grid"]) != list(manifest["grid"]):
    raise ValueError(f"{root} already holds a sweep over {list(existing['grid'])}, not "
                     f"{list(manifest['grid'])}; use another --root")
  existing_cases = existing.get("cases", {})
  changed = sorted(c for c in manifest["cases"] if existing_cases.get(c, manifest["cases"][c])
                   != manifest["cases"][c])
  if changed:
    raise ValueError(f"{root} already holds cases {changed} with other overrides "
                     f"({ {c: existing_cases[c] for c in changed} }); rename them or use another "
                     "--root")
  grid = {k: list(dict.fromkeys(existing["grid"][k] + manifest["grid"][k]))
          for k in manifest["grid"]}
  known = {r["name"] for r in existing["runs"]}
  runs = existing["runs"] + [r for r in manifest["runs"] if r["name"] not in known]
  return {**manifest, "grid": grid, "runs": runs, "cases": existing_cases | manifest["cases"]}


def write_plan(root: str, manifest: dict, lines: Sequence[str]) -> None:
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, MANIFEST_FILE), "w") as f:
    json.dump(manifest, f, indent=2)
  with open(os.path.join(root, COMMANDS_FILE), "w") as f:
    f.write("".join(line + "\n" for line in lines))


def stream_to_log(args: Sequence[str], log_path: str) -> int:
  """Runs `python -m simclr_jax.main ARGS`, echoing its output and appending it to log_path."""
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  python_path = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
  with open(log_path, "a") as log:
    process = subprocess.Popen([sys.executable, "-m", ENTRY_MODULE, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": python_path})
    for line in process.stdout:
      sys.stdout.write(line)
      log.write(line)
    return process.wait()


def execute_sweep(stages: Sequence[Stage], runs: Sequence[Run],
                  launch: Callable[[Sequence[str], str], int] = stream_to_log) -> list[str]:
  """Runs each run's stages in order, skipping stages whose results.json exists.

  Returns the names of failed runs; a failure does not stop the other runs, and a failed
  pretraining skips that run's probe.
  """
  failed = []
  for index, run in enumerate(runs, 1):
    for stage in stages:
      stage_dir = stage.workdir(run)
      prefix = f"[{index}/{len(runs)}] {run.name}: {stage.name}"
      if os.path.exists(os.path.join(stage_dir, RESULTS_FILE)):
        print(f"{prefix} done, skipped", flush=True)
        continue
      print(prefix, flush=True)
      code = launch(stage.args(run), os.path.join(stage_dir, LOG_FILE))
      if code != 0 or not os.path.exists(os.path.join(stage_dir, RESULTS_FILE)):
        print(f"{prefix} FAILED (exit code {code}, no {RESULTS_FILE} written); see "
              f"{os.path.join(stage_dir, LOG_FILE)}", flush=True)
        failed.append(run.name)
        break
  return failed


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True,
                      help="recipe, e.g. configs/cifar10_pretrain.py:cpu")
  parser.add_argument("--grid", action="append", default=[],
                      help="key=v1,v2,... (repeat for more keys: the cartesian product is run)")
  parser.add_argument("--set", action="append", default=[], dest="fixed",
                      help="key=value override for every pretraining run")
  parser.add_argument("--case", action="append", default=[], dest="cases",
                      help="NAME or 'NAME:key=value;key=value': a named set of overrides, "
                      "crossed with the grid (repeat for more cases)")
  parser.add_argument("--root", required=True, help="sweep directory: one subdirectory per run")
  parser.add_argument("--probe_config", default="",
                      help="linear-probe recipe run on each finished run's export (init_from)")
  parser.add_argument("--probe_set", action="append", default=[],
                      help="key=value override for every probe run")
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument("--run", action="store_true", help="run here, one after another")
  mode.add_argument("--print_commands", action="store_true",
                    help="print the launch commands (also in ROOT/commands.sh) instead")
  return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
  args = _parse_args(argv)
  grid = parse_grid(args.grid)
  fixed = parse_assignments(args.fixed, "set")
  probe_fixed = parse_assignments(args.probe_set, "probe_set")
  if probe_fixed and not args.probe_config:
    raise ValueError("--probe_set needs --probe_config")
  cases = parse_cases(args.cases)
  runs = plan_sweep(args.config, grid, fixed, cases)
  stages = build_stages(args.config, args.root, args.probe_config, probe_fixed)
  for run in runs:
    for stage in stages[1:]:  # plan_sweep has already checked the pretraining overrides
      stage.validate(run)
  manifest = merge_with_existing(
      args.root, _manifest(args.config, grid, fixed, args.probe_config, probe_fixed, runs, cases))
  lines = [shell_line(stages, run) for run in runs]
  write_plan(args.root, manifest, lines)
  if args.print_commands:
    print("\n".join(lines))
    return 0
  print(f"{len(runs)} runs in {args.root} (manifest {MANIFEST_FILE}, commands {COMMANDS_FILE})",
        flush=True)
  failed = execute_sweep(stages, runs)
  if failed:
    print(f"{len(failed)} of {len(runs)} runs failed: {failed}; re-run the same command to retry "
          "them (finished runs are skipped)", flush=True)
    return 1
  print(f"all {len(runs)} runs finished; table: python experiments/aggregate.py {args.root}",
        flush=True)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, REPO_ROOT)  # recipes import configs.common.
  try:
    sys.exit(main(sys.argv[1:]))
  except (ValueError, FileNotFoundError) as error:
    sys.exit(f"sweep.py: error: {error}")
