"""Training curves of one run or several: the x axes (step, minutes across a resume, epochs)."""
import json
import os

import numpy as np
import pytest

from simclr_jax.visualize import curves


def write_run(workdir, steps, uptimes, *, epochs_per_step=None):
  """A run's metrics.jsonl as the loop writes it: progress, train and k-NN records."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step, uptime in zip(steps, uptimes):
      f.write(json.dumps({"step": step, "uptime": uptime}) + "\n")
      f.write(json.dumps({"step": step, "loss": 10.0 / step, "contrastive_accuracy": 0.5,
                          "probe_top1": 0.3}) + "\n")
    f.write(json.dumps({"step": steps[-1], "knn_top1": 0.4}) + "\n")
    f.write('{"step": 99, "loss"')  # the truncated last line of a killed run
  if epochs_per_step is not None:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"step": steps[-1], "epochs": steps[-1] * epochs_per_step}, f)
  return os.path.join(workdir, "metrics.jsonl")


def test_minutes_continue_across_a_resume(tmp_path):
  # Steps 10-30 ran in the first process; the resumed one restarted uptime at step 40.
  path = write_run(tmp_path / "run", [10, 20, 30, 40, 50], [60.0, 120.0, 180.0, 30.0, 90.0])
  to_minutes = curves.steps_to_x(path, curves.read_metrics(path), "minutes")
  np.testing.assert_allclose(to_minutes([10, 30, 40, 45, 50]), [1.0, 3.0, 3.5, 4.0, 4.5])


def test_epochs_come_from_the_finished_run(tmp_path):
  path = write_run(tmp_path / "run", [10, 20], [1.0, 2.0], epochs_per_step=0.25)
  to_epochs = curves.steps_to_x(path, curves.read_metrics(path), "epochs")
  np.testing.assert_allclose(to_epochs([4, 20]), [1.0, 5.0])
  unfinished = write_run(tmp_path / "unfinished", [10], [1.0])
  with pytest.raises(ValueError, match="finished run's .*results.json"):
    curves.steps_to_x(unfinished, curves.read_metrics(unfinished), "epochs")


def test_a_run_without_progress_records_is_plotted_against_the_step_only(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
  with pytest.raises(ValueError, match="no 'uptime' records: plot it against the step"):
    curves.plot_runs({"a": str(path)}, str(tmp_path / "out.png"), x="minutes")
  assert os.path.getsize(curves.plot_runs({"a": str(path)}, str(tmp_path / "out.png"))) > 1000


def test_the_command_line_compares_runs(tmp_path, capsys):
  first = write_run(tmp_path / "short", [10, 20], [6.0, 12.0])
  second = write_run(tmp_path / "long", [10, 20, 40], [6.0, 12.0, 24.0])
  out = str(tmp_path / "compare.png")
  curves.main(["--x=minutes", first, f"40 steps={second}", out])
  assert capsys.readouterr().out.strip() == out
  assert os.path.getsize(out) > 10_000
  with pytest.raises(SystemExit):
    curves.main([f"a={first}", f"a={second}", out])
  assert "two runs are labelled 'a'" in capsys.readouterr().err
