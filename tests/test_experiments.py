"""Sweep runner, results aggregator and benchmark helpers, without training anything.

The sweep's launcher is replaced by a fake that writes results.json, so resumption, failures and
the probe stage are checked in milliseconds; the recipes are toy config files in tmp_path.
"""
import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests.helpers import relative_distance


EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


sweep = _load("sweep", os.path.join(EXPERIMENTS, "sweep.py"))
aggregate = _load("aggregate", os.path.join(EXPERIMENTS, "aggregate.py"))
ntxent_memory = _load("ntxent_memory", os.path.join(EXPERIMENTS, "benchmarks", "ntxent_memory.py"))
train_step = _load("train_step", os.path.join(EXPERIMENTS, "benchmarks", "train_step.py"))
conv_layers = _load("conv_layers", os.path.join(EXPERIMENTS, "benchmarks", "conv_layers.py"))
batch_norm_benchmark = _load("batch_norm_benchmark",
                             os.path.join(EXPERIMENTS, "benchmarks", "batch_norm.py"))
STEP_PHASES_SCRIPT = os.path.join(EXPERIMENTS, "benchmarks", "step_phases.py")
step_phases = _load("step_phases", STEP_PHASES_SCRIPT)

PRETRAIN_CONFIG = """
import ml_collections

def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.mode = 'pretrain'
  config.variant = arg or ''
  config.temperature = 0.5
  config.num_train_steps = 10
  config.augment_preset = 'simclr_cifar'
  config.optimizer = ml_collections.ConfigDict({'name': 'lars', 'base_learning_rate': 1.0})
  config.model = ml_collections.ConfigDict({'depth': 18, 'width_multiplier': 1.0})
  config.data_dir = ''
  config.blur_p = (0.5, 0.5)
  return config
"""
PROBE_CONFIG = """
import ml_collections

def get_config(arg=None):
  return ml_collections.ConfigDict({
      'mode': 'linear_probe', 'init_from': '', 'num_epochs': 1, 'data_dir': '',
      'model': ml_collections.ConfigDict({'depth': 18, 'width_multiplier': 0.25})})
"""


@pytest.fixture
def recipes(tmp_path):
  pretrain = tmp_path / "toy_pretrain.py"
  probe = tmp_path / "toy_probe.py"
  pretrain.write_text(textwrap.dedent(PRETRAIN_CONFIG))
  probe.write_text(textwrap.dedent(PROBE_CONFIG))
  return f"{pretrain}:cpu", f"{probe}"


def fake_launcher(calls, fail_names=(), results=None):
  """Stands in for `python -m simclr_jax.main`: records the call, writes results.json."""

  def launch(args, log_path):
    calls.append(list(args))
    workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
    if any(name in workdir for name in fail_names):
      return 1
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results(workdir) if results else {"mode": "x", "loss": 1.0}, f)
    return 0

  return launch


def test_split_values_keeps_bracketed_commas_together():
  assert sweep.split_values("0.1, 0.2,0.5") == ["0.1", "0.2", "0.5"]
  assert sweep.split_values("(1,2),(3,4)") == ["(1,2)", "(3,4)"]
  assert sweep.split_values("'a,b',c") == ["'a,b'", "c"]
  for bad in ("1,,2", "(1,2", "'a"):
    with pytest.raises(ValueError, match="cannot split"):
      sweep.split_values(bad)


def test_parse_grid_and_assignments_reject_malformed_input():
  assert sweep.parse_grid(["temperature=0.1,0.5", "model.depth=18"]) == {
      "temperature": ["0.1", "0.5"], "model.depth": ["18"]}
  with pytest.raises(ValueError, match="twice"):
    sweep.parse_grid(["temperature=0.1", "temperature=0.2"])
  with pytest.raises(ValueError, match="repeats"):
    sweep.parse_grid(["temperature=0.1,0.1"])
  with pytest.raises(ValueError, match="key=value"):
    sweep.parse_grid(["temperature"])
  with pytest.raises(ValueError, match="twice"):
    sweep.parse_assignments(["a=1", "a=2"])


def test_run_names_use_the_shortest_unique_key_suffix():
  labels = sweep.run_names({"optimizer.base_learning_rate": [], "temperature": [],
                            "model.width_multiplier": [], "augment.width_multiplier": []})
  assert labels == {"optimizer.base_learning_rate": "base_learning_rate",
                    "temperature": "temperature",
                    "model.width_multiplier": "model.width_multiplier",
                    "augment.width_multiplier": "augment.width_multiplier"}


def test_plan_sweep_is_the_typed_cartesian_product(recipes):
  config, _ = recipes
  runs = sweep.plan_sweep(config, {"temperature": ["0.1", "0.2", "0.5"],
                                   "optimizer.base_learning_rate": ["0.5", "1"]},
                          {"num_train_steps": "3"})
  assert len(runs) == 6
  assert runs[0].name == "temperature=0.1,base_learning_rate=0.5"
  assert runs[3].values == {"temperature": 0.2, "optimizer.base_learning_rate": 1.0}
  assert isinstance(runs[3].values["optimizer.base_learning_rate"], float)
  assert runs[0].overrides == {"num_train_steps": "3", "temperature": "0.1",
                               "optimizer.base_learning_rate": "0.5"}


@pytest.mark.parametrize("grid, fixed, message", [
    ({"temprature": ["0.1"]}, {}, "Did you mean \"temperature\""),
    ({"optimizer.nme": ["sgd"]}, {}, "Did you mean \"name\""),
    ({"num_train_steps": ["1", "2.5"]}, {}, "2.5"),
    ({"temperature": ["0.1"]}, {"temperature": "0.2"}, "both swept"),
    ({"augment_preset": ["a/b", "a-b"]}, {}, "same run directory"),
])
def test_plan_sweep_fails_fast_on_bad_keys_and_values(recipes, grid, fixed, message):
  config, _ = recipes
  with pytest.raises(ValueError, match=message):
    sweep.plan_sweep(config, grid, fixed)


def test_missing_config_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.py"):
    sweep.load_config(str(tmp_path / "nope.py") + ":cpu", {})


def test_an_error_raised_by_get_config_is_reported_without_its_traceback(tmp_path):
  recipe = tmp_path / "strict.py"
  recipe.write_text("def get_config(arg=None):\n  raise ValueError('unknown variant ' + arg)\n")
  with pytest.raises(ValueError, match=r"strict.py:big with overrides \{\}: ValueError: "
                     r"unknown variant big$"):
    sweep.load_config(f"{recipe}:big", {})


def test_print_commands_writes_manifest_and_one_line_per_run(recipes, tmp_path, capsys):
  config, probe = recipes
  root = str(tmp_path / "sweep")
  code = sweep.main([f"--config={config}", "--grid=temperature=0.1,0.5",
                     "--grid=optimizer.name=sgd,lars", "--set=num_train_steps=3",
                     f"--root={root}", f"--probe_config={probe}", "--probe_set=num_epochs=2",
                     "--print_commands"])
  assert code == 0
  printed = capsys.readouterr().out.strip().splitlines()
  with open(os.path.join(root, "commands.sh")) as f:
    assert f.read().strip().splitlines() == printed
  assert len(printed) == 4
  first = printed[0]
  run_dir = os.path.join(root, "temperature=0.1,name=sgd")
  assert first.startswith("${PYTHON:-python} -m simclr_jax.main --config=")
  assert f"--workdir={run_dir}" in first
  pretrain, probe_stage = first.split(" && ")
  assert pretrain.endswith(
      "--config.num_train_steps=3 --config.temperature=0.1 --config.optimizer.name=sgd")
  assert f"--workdir={os.path.join(run_dir, 'probe')}" in probe_stage
  assert f"--config.init_from={os.path.join(run_dir, 'export')}" in probe_stage
  assert "--config.num_epochs=2" in probe_stage and "num_epochs" not in pretrain
  with open(os.path.join(root, "sweep.json")) as f:
    manifest = json.load(f)
  assert [r["name"] for r in manifest["runs"]][:2] == ["temperature=0.1,name=sgd",
                                                      "temperature=0.1,name=lars"]
  assert manifest["runs"][1]["values"] == {"temperature": 0.1, "optimizer.name": "lars"}


def test_probe_gets_the_pretrained_model_and_data_dir(recipes, tmp_path):
  config, probe = recipes
  runs = sweep.plan_sweep(config, {"model.width_multiplier": ["0.25", "0.5"]},
                          {"data_dir": "/data/tfds"})
  probe_stage = sweep.build_stages(config, str(tmp_path), probe, {"num_epochs": "3"})[1]
  assert probe_stage.overrides(runs[0]) == {
      "data_dir": "/data/tfds", "num_epochs": "3",
      "init_from": os.path.join(str(tmp_path), "width_multiplier=0.25", "export")}
  assert probe_stage.overrides(runs[1])["model.width_multiplier"] == "0.5"
  explicit = sweep.build_stages(config, str(tmp_path), probe,
                                {"model.width_multiplier": "2"})[1]
  assert explicit.overrides(runs[1])["model.width_multiplier"] == "2"
  with pytest.raises(ValueError, match="init_from"):
    sweep.build_stages(config, str(tmp_path), probe, {"init_from": "x"})


def test_probe_overrides_are_checked_against_the_probe_recipe(recipes, tmp_path):
  config, probe = recipes
  with pytest.raises(ValueError, match="num_epoch"):
    sweep.main([f"--config={config}", "--grid=temperature=0.1", f"--root={tmp_path}",
                f"--probe_config={probe}", "--probe_set=num_epoch=2", "--print_commands"])


def test_execute_skips_finished_runs_and_retries_failed_ones(recipes, tmp_path):
  config, probe = recipes
  root = str(tmp_path)
  runs = sweep.plan_sweep(config, {"temperature": ["0.1", "0.2", "0.5"]}, {})
  stages = sweep.build_stages(config, root, probe, {})
  calls = []
  failed = sweep.execute_sweep(stages, runs, fake_launcher(calls, fail_names=["0.2"]))
  assert failed == ["temperature=0.2"]
  # 0.1 and 0.5: pretrain + probe; 0.2: pretrain failed, so no probe.
  assert len(calls) == 5
  assert os.path.exists(os.path.join(root, "temperature=0.5", "probe", "results.json"))

  calls.clear()
  assert sweep.execute_sweep(stages, runs, fake_launcher(calls)) == []
  assert [c[1] for c in calls] == [f"--workdir={os.path.join(root, 'temperature=0.2')}",
                                   f"--workdir={os.path.join(root, 'temperature=0.2', 'probe')}"]

  calls.clear()
  assert sweep.execute_sweep(stages, runs, fake_launcher(calls)) == []
  assert calls == []


def test_a_launch_that_exits_zero_without_results_counts_as_failed(recipes, tmp_path):
  config, _ = recipes
  runs = sweep.plan_sweep(config, {"temperature": ["0.1"]}, {})
  stages = sweep.build_stages(config, str(tmp_path))
  assert sweep.execute_sweep(stages, runs, lambda args, log: 0) == ["temperature=0.1"]


def test_rerunning_with_more_values_extends_the_manifest(recipes, tmp_path):
  config, _ = recipes
  root = str(tmp_path)
  common = [f"--config={config}", f"--root={root}", "--print_commands"]
  sweep.main(common + ["--grid=temperature=0.1,0.2"])
  sweep.main(common + ["--grid=temperature=0.2,0.5"])
  with open(os.path.join(root, "sweep.json")) as f:
    manifest = json.load(f)
  assert [r["name"] for r in manifest["runs"]] == [
      "temperature=0.1", "temperature=0.2", "temperature=0.5"]
  assert manifest["grid"] == {"temperature": ["0.1", "0.2", "0.5"]}
  with pytest.raises(ValueError, match="another --root"):
    sweep.main(common + ["--grid=optimizer.name=sgd"])
  with pytest.raises(ValueError, match="another --root"):
    sweep.main(common + ["--grid=temperature=0.1", "--set=num_train_steps=5"])
  _, probe = recipes
  sweep.main(common + ["--grid=temperature=0.1", f"--probe_config={probe}"])
  with pytest.raises(ValueError, match="another --root"):
    sweep.main(common + ["--grid=temperature=0.1", f"--probe_config={probe}",
                         "--probe_set=num_epochs=4"])


def _finished_sweep(recipes, tmp_path, with_probe=True):
  config, probe = recipes
  root = str(tmp_path / "sweep")
  args = [f"--config={config}", "--grid=temperature=0.1,0.2,0.5",
          "--grid=optimizer.base_learning_rate=0.5,2", f"--root={root}", "--print_commands"]
  sweep.main(args + ([f"--probe_config={probe}"] if with_probe else []))
  runs = sweep.plan_sweep(config, {"temperature": ["0.1", "0.2", "0.5"],
                                   "optimizer.base_learning_rate": ["0.5", "2"]}, {})

  def results(workdir):
    if workdir.endswith("probe"):
      return {"mode": "linear_probe", "top1": 0.5 + 0.1 * ("0.5" in workdir)}
    temperature = float(workdir.split("temperature=")[1].split(",")[0])
    return {"mode": "pretrain", "dataset": "toy", "loss": 5 - temperature, "knn_top1": temperature}

  stages = sweep.build_stages(config, root, probe if with_probe else "", {})
  sweep.execute_sweep(stages, runs[:-1], fake_launcher([], results=results))
  return root


def test_aggregate_writes_sorted_table_csv_and_plot(recipes, tmp_path):
  root = _finished_sweep(recipes, tmp_path)
  out = str(tmp_path / "table")
  paths = aggregate.aggregate(root, out=out, sort="knn_top1")
  assert set(paths) == {"markdown", "csv", "plot"}
  with open(paths["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["run", "temperature", "optimizer.base_learning_rate", "loss",
                           "knn_top1", "probe/top1", "status"]
  assert [r["knn_top1"] for r in rows] == ["0.5", "0.2", "0.2", "0.1", "0.1", ""]
  assert rows[0]["probe/top1"] == "0.6" and rows[-1]["status"] == "not started"
  with open(paths["markdown"]) as f:
    markdown = f.read()
  assert "Sorted by `knn_top1`, highest first." in markdown
  assert "| temperature=0.5,base_learning_rate=0.5 | 0.5 | 0.5 | 4.5 | 0.5 | 0.6 | done |" in (
      markdown)
  with open(paths["plot"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_aggregate_sorts_ascending_and_reports_missing_probes(recipes, tmp_path):
  root = _finished_sweep(recipes, tmp_path)
  os.remove(os.path.join(root, "temperature=0.1,base_learning_rate=2", "probe", "results.json"))
  paths = aggregate.aggregate(root, sort="loss", ascending=True)
  with open(paths["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert [float(r["loss"]) for r in rows[:-1]] == sorted(float(r["loss"]) for r in rows[:-1])
  statuses = {r["run"]: r["status"] for r in rows}
  assert statuses["temperature=0.1,base_learning_rate=2"] == "probe missing"
  with pytest.raises(ValueError, match="cannot sort by 'top5'"):
    aggregate.aggregate(root, sort="top5")
  with pytest.raises(ValueError, match="cannot plot"):
    aggregate.aggregate(root, metric="top5")
  paths = aggregate.aggregate(root, columns=["probe/top1"])
  with open(paths["markdown"]) as f:
    assert "| run | temperature | optimizer.base_learning_rate | probe/top1 | status |" in f.read()
  with open(paths["csv"]) as f:
    assert "knn_top1" in f.readline()
  with pytest.raises(ValueError, match="unknown --columns"):
    aggregate.aggregate(root, columns=["top5"])


def test_aggregate_without_manifest_takes_every_run_directory(tmp_path):
  for name, top1 in (("b", 0.2), ("a", 0.4)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps({"mode": "pretrain", "top1": top1}))
  (tmp_path / "notes").mkdir()
  paths = aggregate.aggregate(str(tmp_path))
  with open(paths["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert [(r["run"], r["top1"]) for r in rows] == [("a", "0.4"), ("b", "0.2")]
  assert "plot" in paths
  with pytest.raises(FileNotFoundError, match="no sweep.json"):
    aggregate.aggregate(str(tmp_path / "notes"))


def test_tuple_valued_fields_sweep_and_aggregate(recipes, tmp_path):
  config, _ = recipes
  root = str(tmp_path / "sweep")
  sweep.main([f"--config={config}", "--grid=blur_p=(0.8,0.8),(1.0,0.1)", f"--root={root}",
              "--print_commands"])
  runs = sweep.plan_sweep(config, {"blur_p": ["(0.8,0.8)", "(1.0,0.1)"]}, {})
  assert [r.values["blur_p"] for r in runs] == [(0.8, 0.8), (1.0, 0.1)]
  stages = sweep.build_stages(config, root)
  sweep.execute_sweep(stages, runs, fake_launcher(
      [], results=lambda workdir: {"top1": 0.5 if "1.0" in workdir else 0.3}))
  paths = aggregate.aggregate(root, sort="top1")
  with open(paths["markdown"]) as f:
    assert "| blur_p=1.0-0.1 | (1.0, 0.1) | 0.5 | done |" in f.read()
  assert "plot" in paths


def test_aggregate_names_a_corrupt_results_file(recipes, tmp_path):
  root = _finished_sweep(recipes, tmp_path, with_probe=False)
  broken = os.path.join(root, "temperature=0.2,base_learning_rate=2", "results.json")
  with open(broken, "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="results.json is not valid JSON"):
    aggregate.aggregate(root)


def test_ntxent_memory_per_device_temporaries_shrink_with_devices():
  single = ntxent_memory.measure(512, 1, dim=16, timed=True, repeats=1)
  sharded = ntxent_memory.measure(512, 8, dim=16, timed=True, repeats=1)
  assert sharded["temp_bytes"] < single["temp_bytes"] / 3
  assert single["seconds"] > 0 and sharded["seconds"] > 0
  assert "| 512 | 8 |" in ntxent_memory.table([single, sharded])


def test_train_step_benchmark_runs_the_trainer_step_and_counts_its_flops():
  config = train_step.model_config(18, 0.125, cifar_stem=True)
  step, (state, batch) = train_step.build_pretrain_step(config, batch_size=4, image_size=8)
  before = jax.tree.map(np.asarray, state.params)
  compiled = step.lower(state, batch).compile()
  assert train_step.flops_of(compiled) > 1e6
  state, metrics = compiled(state, batch)
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
  changed = jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)), before, state.params)
  assert any(jax.tree.leaves(changed))


def test_train_step_benchmark_measures_a_ceiling_per_precision_and_keeps_the_fastest():
  """bfloat16 rows are measured against bfloat16 matmuls (XLA's dot and the oneDNN kernels),
  float32 rows against XLA's float32 dot; each ceiling is the fastest of the runs and sources."""
  measured = train_step.measure_ceilings(256, 1, "", {"float32", "bfloat16"}, env={})
  assert set(measured) == {("float32", "XLA dot"), ("bfloat16", "XLA dot"),
                           ("bfloat16", "oneDNN 1x1 conv")}
  assert all(gflops > 0 for gflops in measured.values())
  runs = [{("float32", "XLA dot"): 5.0, ("bfloat16", "XLA dot"): 4.0,
           ("bfloat16", "oneDNN 1x1 conv"): 9.0},
          {("float32", "XLA dot"): 6.0, ("bfloat16", "XLA dot"): 11.0,
           ("bfloat16", "oneDNN 1x1 conv"): 10.0}]
  assert train_step.best_ceilings(runs) == {"float32": ("XLA dot", 6.0),
                                            "bfloat16": ("XLA dot", 11.0)}


def test_train_step_benchmark_rejects_an_interpreter_without_torch():
  with pytest.raises(ValueError, match="cannot import torch"):
    train_step.check_torch_python(sys.executable)
  with pytest.raises(ValueError, match="cannot import torch"):
    conv_layers.torch_rows(sys.executable, [(4, 4)], batch=2, dtype="float32", repeats=1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_conv_layers_benchmark_times_every_pass_of_every_backend(dtype):
  gflops = conv_layers.layer_row(2, 4, 4, 1, jax.numpy.dtype(dtype))
  passes = {"xla fwd", "xla dx", "xla dk", "im2col fwd", "im2col dk", "saved-patches dk",
            "onednn fwd", "onednn dx+dk"}
  assert set(gflops) == passes
  assert all(np.isfinite(value) and value > 0 for value in gflops.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("residual", [False, True])
def test_batch_norm_benchmark_times_the_same_pass_on_both_backends(residual, dtype):
  """The same outputs and gradients from both backends: to float32 rounding, or for bfloat16
  maps within a few bfloat16 roundings (nn.BatchNorm rounds at more places than the kernels;
  tests/test_batch_norm.py holds both to float64)."""
  dtype = jax.numpy.dtype(dtype)
  x, residual_map, dy = (jax.numpy.asarray(np.random.default_rng(seed).standard_normal(
      (4, 4, 4, 8)), dtype) for seed in range(3))
  results = []
  for native in (False, True):
    module, run = batch_norm_benchmark.training_pass(native, residual, dtype)
    results.append(run(module.init(jax.random.key(0), x), x, residual_map, dy))
  if dtype == np.float32:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *results)
  else:
    assert relative_distance(results[1], results[0]) < 1e-2  # measured: 1.3e-3 and 2.1e-3


def test_batch_norm_benchmark_prints_a_row_per_stage(capsys):
  batch_norm_benchmark.main(["--images=2", "--calls=1", "--repeats=1"])
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2x")]
  assert [row.split(" | ")[0] for row in rows] == ["| 2x32x32x16", "| 2x16x16x32", "| 2x8x8x64",
                                                   "| 2x4x4x128"]


def test_cases_are_named_override_sets_crossed_with_the_grid(recipes, tmp_path):
  config, _ = recipes
  cases = sweep.parse_cases(["recipe", "sgd:optimizer.name=sgd;optimizer.base_learning_rate=0.1"])
  assert cases == {"recipe": {}, "sgd": {"optimizer.name": "sgd",
                                         "optimizer.base_learning_rate": "0.1"}}
  runs = sweep.plan_sweep(config, {"temperature": ["0.1", "0.5"]}, {"num_train_steps": "5"}, cases)
  assert [r.name for r in runs] == ["case=recipe,temperature=0.1", "case=recipe,temperature=0.5",
                                    "case=sgd,temperature=0.1", "case=sgd,temperature=0.5"]
  assert runs[2].values == {"case": "sgd", "temperature": 0.1}
  assert runs[2].overrides == {"num_train_steps": "5", "optimizer.name": "sgd",
                               "optimizer.base_learning_rate": "0.1", "temperature": "0.1"}
  assert runs[0].overrides == {"num_train_steps": "5", "temperature": "0.1"}


@pytest.mark.parametrize("specs,grid,fixed,message", [
    (["a b"], {}, {}, "needs a name"),
    ([":temperature=0.1"], {}, {}, "needs a name"),
    (["a", "a:temperature=0.1"], {}, {}, "twice"),
    (["a:temperature=0.1"], {"temperature": ["0.5"]}, {}, "keep one"),
    (["a:num_train_steps=3"], {}, {"num_train_steps": "5"}, "keep one"),
    (["a:temprature=0.1"], {}, {}, "temprature"),
    (["a"], {"case": ["x"]}, {}, "cannot be a --grid key"),
])
def test_bad_cases_fail_before_anything_runs(recipes, specs, grid, fixed, message):
  config, _ = recipes
  with pytest.raises(ValueError, match=message):
    sweep.plan_sweep(config, grid, fixed, sweep.parse_cases(specs))


def test_more_cases_extend_the_manifest_and_a_changed_case_is_refused(recipes, tmp_path):
  config, _ = recipes
  common = [f"--config={config}", f"--root={tmp_path}", "--grid=temperature=0.1",
            "--print_commands"]
  sweep.main(common + ["--case=recipe", "--case=sgd:optimizer.name=sgd"])
  sweep.main(common + ["--case=adamw:optimizer.name=adamw"])
  with open(tmp_path / "sweep.json") as f:
    manifest = json.load(f)
  assert manifest["grid"] == {"case": ["recipe", "sgd", "adamw"], "temperature": ["0.1"]}
  assert manifest["cases"] == {"recipe": {}, "sgd": {"optimizer.name": "sgd"},
                               "adamw": {"optimizer.name": "adamw"}}
  assert [r["name"] for r in manifest["runs"]] == [
      "case=recipe,temperature=0.1", "case=sgd,temperature=0.1", "case=adamw,temperature=0.1"]
  with pytest.raises(ValueError, match="other overrides"):
    sweep.main(common + ["--case=sgd:optimizer.name=lars"])


def test_aggregate_over_a_key_reports_each_groups_mean_and_range(recipes, tmp_path):
  config, _ = recipes
  root = str(tmp_path / "sweep")
  sweep.main([f"--config={config}", f"--root={root}", "--case=a", "--case=b:variant=b",
              "--grid=temperature=0.1,0.2,0.3", "--print_commands"])
  runs = sweep.plan_sweep(config, {"temperature": ["0.1", "0.2", "0.3"]}, {},
                          {"a": {}, "b": {"variant": "b"}})
  top1 = {"case=a,temperature=0.1": 0.5, "case=a,temperature=0.2": 0.7,
          "case=a,temperature=0.3": 0.6, "case=b,temperature=0.1": 0.4,
          "case=b,temperature=0.2": 0.4}
  stages = sweep.build_stages(config, root)
  sweep.execute_sweep(stages, runs[:5], fake_launcher(
      [], results=lambda workdir: {"knn_top1": top1[os.path.basename(workdir)]}))
  paths = aggregate.aggregate(root, sort="knn_top1", over="temperature")
  with open(paths["markdown"]) as f:
    markdown = f.read()
  assert "| run | case | n | knn_top1 | status |" in markdown
  assert "| case=a | a | 3 | 0.6 (0.5-0.7) | done |" in markdown
  assert "| case=b | b | 2 | 0.4 | 2 of 3 done |" in markdown
  assert markdown.index("case=a |") < markdown.index("case=b |")  # sorted by the mean
  with open(paths["csv"]) as f:
    assert len(list(csv.DictReader(f))) == 6  # the CSV keeps every run
  assert "plot" in paths
  with pytest.raises(ValueError, match="cannot group over 'seed'"):
    aggregate.aggregate(root, over="seed")


def test_step_phases_names_every_phase_of_the_bfloat16_step_from_its_hlo():
  """Every phase is found in the compiled step, and the convolution passes' FLOPs from their
  shapes agree: forward = kernel gradient = input gradient + the stem's (whose input gradient,
  towards the images, is never computed)."""
  batch, size, width = 4, 16, 0.125
  step, (state, batch_arrays) = train_step.build_pretrain_step(
      train_step.model_config(18, width, cifar_stem=True), batch_size=batch, image_size=size,
      augment_preset="simclr_cifar", conv_backend="onednn_bf16", norm_backend="native")
  instructions = step_phases.entry_instructions(step.lower(state, batch_arrays).compile().as_text())
  phases = {step_phases.phase_of(instruction) for instruction in instructions.values()}
  assert phases == set(step_phases.PHASES)
  gflop = dict.fromkeys(step_phases.CONV_PASSES.values(), 0.0)
  for instruction in instructions.values():
    if instruction.target in step_phases.CONV_PASSES:
      gflop[step_phases.CONV_PASSES[instruction.target]] += step_phases.conv_gflop(instruction)
  stem_gflop = 2 * (2 * batch) * size * size * (3 * 3 * 3) * round(64 * width) / 1e9
  assert gflop["conv forward"] == pytest.approx(gflop["conv kernel gradient"])
  assert gflop["conv forward"] - gflop["conv input gradient"] == pytest.approx(stem_gflop)


def test_step_phases_prints_every_phase_their_sum_and_the_step():
  # A subprocess: the trace events need XLA_FLAGS before JAX starts its CPU backend.
  completed = subprocess.run(
      [sys.executable, STEP_PHASES_SCRIPT, "--widths=0.125", "--batch_size=4", "--image_size=16",
       "--steps=1", "--repeats=1", "--matmul_size=256"], capture_output=True, text=True,
      check=False)
  assert completed.returncode == 0, completed.stderr
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1].strip(" |")
          for line in completed.stdout.splitlines() if line.startswith("| ")}
  assert set(step_phases.PHASES) <= set(rows)
  assert float(rows["**sum of the phases**"].split()[0]) > 0
  assert float(rows["step, traced"]) > 0
