"""The linear-probe and fine-tune jobs and prediction pictures, end to end on the generated
synthetic_shapes.

A tiny ResNet-18 (width 1/8, 32 px) is pretrained once per module with the real trainer; the
tests then probe it, fine-tune it and compare with a randomly initialised encoder. Data: the first
1000 train / 500 test images (TFDS split slices), fewer where the accuracy is not the point, so
every pass is a few seconds.
"""
import json
import os
import re

import jax
from etils import epath
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import cifar10_finetune
from configs import cifar10_linear_probe
from configs import cifar10_pretrain
from configs import imagenet_finetune
from configs import imagenet_linear_probe
from configs import imagenette_finetune
from configs import imagenette_linear_probe
from configs import imagenette_pretrain
from configs import smoke_pretrain
from configs import transfer_linear_probe
from simclr_jax import export
from simclr_jax import input_pipeline
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import workdir_files
from simclr_jax.evaluators import classification
from simclr_jax.jobs import finetune
from simclr_jax.jobs import linear_probe
from simclr_jax.jobs import pretrain
from simclr_jax.jobs import supervised
from simclr_jax.tools import predict
from tests.helpers import set_fields

DATASET = "synthetic_shapes"
TRAIN_SPLIT = "train[:1000]"
EVAL_SPLIT = "test[:500]"
SMALL_EVAL_SPLIT = "test[:128]"  # where the test is not about the accuracy
PRETRAIN_STEPS = 200
# Top-1 margins (fractions). Measured on this setup: L-BFGS probe of the pretrained encoder
# 0.53-0.67 (five runs: three seeds, XLA's and oneDNN's convolutions, 1 and 8 devices) vs ~0.17
# for a random one. The pretraining is chaotic: float rounding alone (another device count or
# convolution backend) moves the loss by 1e-4 within 10 steps, and at base rate 1.0 without warmup
# that decided between probes of 0.22 and 0.72 (eight runs). Fine-tuning ~0.69 vs ~0.51 for the
# SGD probe, same recipe. (With 100 pretraining or 60 fine-tuning steps the fine-tuning margin
# fell to 0.03 in one run.)
PROBE_MARGIN = 0.15
FINETUNE_STEPS = 120
FINETUNE_MARGIN = 0.08


def one_device_mesh():
  return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def pretrained_export(data_dir, tmp_path_factory) -> str:
  """The trainer on the smoke model for PRETRAIN_STEPS steps on one device; its export.

  The optimisation is pinned here (LARS, base rate 0.3 with the square-root rule after a 31-step
  warmup, T=0.5, batch 32), so the margins below do not move when the smoke recipe changes.
  """
  config = set_fields(smoke_pretrain.get_config(), data_dir=data_dir, evals__knn__enabled=False,
                      num_train_steps=PRETRAIN_STEPS, checkpoint_every_steps=PRETRAIN_STEPS,
                      log_every_steps=50, global_batch_size=32, temperature=0.5,
                      optimizer__name="lars", optimizer__base_learning_rate=0.3,
                      optimizer__lr_scaling="sqrt", optimizer__warmup_epochs=0.2,
                      optimizer__weight_decay=5e-5)
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  pretrain.run(config, workdir, mesh=one_device_mesh())
  return os.path.join(workdir, workdir_files.EXPORT_DIR)


@pytest.fixture(scope="module")
def random_export(data_dir, tmp_path_factory) -> str:
  """The smoke pretraining's encoder at its random initialisation (the probes' baseline)."""
  config = set_fields(smoke_pretrain.get_config(), data_dir=data_dir)
  return pretrain.export_initialization(config, str(tmp_path_factory.mktemp("random")))


def probe_config(data_dir, init_from, **overrides):
  fields = dict(data_dir=data_dir, init_from=init_from, train_split=TRAIN_SPLIT,
                eval_split=EVAL_SPLIT) | overrides
  return set_fields(cifar10_linear_probe.get_config("smoke"), **fields)


def finetune_config(data_dir, init_from, **overrides):
  fields = dict(data_dir=data_dir, init_from=init_from, train_split=TRAIN_SPLIT,
                eval_split=EVAL_SPLIT) | overrides
  return set_fields(cifar10_finetune.get_config("smoke"), **fields)


@pytest.fixture(scope="module")
def probe_results(data_dir, pretrained_export, random_export, tmp_path_factory):
  """L-BFGS probes of the pretrained and the random encoder: (pretrained, random, workdir)."""
  results = {}
  for name, init_from in (("pretrained", pretrained_export), ("random", random_export)):
    workdir = str(tmp_path_factory.mktemp(f"probe_{name}"))
    results[name] = linear_probe.run(
        probe_config(data_dir, init_from, probe_protocol="lbfgs"), workdir,
        mesh=one_device_mesh())
    results[f"{name}_workdir"] = workdir
  return results


def test_probe_of_the_pretrained_encoder_beats_a_random_encoder(probe_results):
  pretrained, random = probe_results["pretrained"], probe_results["random"]
  numbers = (f"pretrained top-1 {pretrained['top1']:.3f} (k-NN {pretrained['knn_top1']:.3f}), "
             f"random {random['top1']:.3f} (k-NN {random['knn_top1']:.3f})")
  assert pretrained["top1"] >= random["top1"] + PROBE_MARGIN, numbers
  assert pretrained["knn_top1"] > random["knn_top1"], numbers


def test_probe_writes_results_pictures_and_a_classifier_export(probe_results, pretrained_export):
  workdir, results = probe_results["pretrained_workdir"], probe_results["pretrained"]
  with open(os.path.join(workdir, workdir_files.RESULTS_FILE)) as f:
    assert json.load(f) == results
  assert results["mode"] == "linear_probe" and results["dataset"] == DATASET
  assert results["num_eval_examples"] == 500 and results["num_train_examples"] == 1000
  assert results["top1"] <= results["top5"] <= 1.0
  assert 0.0 < results["mean_per_class_accuracy"] <= 1.0
  assert results["linear_l2"] > 0
  for picture in (classification.PREDICTIONS_FILE, classification.CONFUSION_MATRIX_FILE):
    assert os.path.getsize(os.path.join(workdir, picture)) > 10_000
  with open(os.path.join(workdir, workdir_files.METRICS_FILE)) as f:
    assert any("final_top1" in json.loads(line) for line in f)
  # The export holds the pretrained encoder, bit for bit, and the fitted head.
  probed = export.load_encoder(os.path.join(workdir, workdir_files.EXPORT_DIR))
  original = export.load_encoder(pretrained_export)
  jax.tree.map(np.testing.assert_array_equal, probed.params["encoder"], original.params["encoder"])
  jax.tree.map(np.testing.assert_array_equal, probed.batch_stats["encoder"],
               original.batch_stats["encoder"])
  assert probed.params["supervised_head"]["dense"]["kernel"].shape == (64, 10)
  assert probed.metadata["class_names"][0] == "circle"


def test_rerunning_a_finished_probe_returns_its_results_or_refuses_another_config(
    probe_results, data_dir, pretrained_export):
  workdir = probe_results["pretrained_workdir"]
  config = probe_config(data_dir, pretrained_export, probe_protocol="lbfgs")
  assert linear_probe.run(config, workdir) == probe_results["pretrained"]
  config.evals.knn.k = 5
  with pytest.raises(ValueError, match="another config"):
    linear_probe.run(config, workdir)


def test_prediction_tool_reproduces_the_probe_accuracy(probe_results, data_dir, tmp_path):
  out = str(tmp_path / "grid.png")
  result = predict.predict(probe_results["pretrained_workdir"], DATASET, data_dir=data_dir,
                           split=EVAL_SPLIT, out=out, num_images=16,
                           confusion_matrix=str(tmp_path / "matrix.png"))
  assert result["num_examples"] == 500
  # The folded standardisation gives the same logits up to float rounding.
  assert result["top1"] == pytest.approx(probe_results["pretrained"]["top1"], abs=0.005)
  assert os.path.getsize(out) > 10_000


def test_finetuning_beats_the_probe_with_the_same_recipe(data_dir, pretrained_export,
                                                         probe_results, tmp_path):
  """Same labels, steps, batch, LR schedule and crop + flip; only the encoder's freedom differs."""
  recipe = dict(num_train_steps=FINETUNE_STEPS, global_batch_size=32, eval_every_steps=0,
                optimizer__base_learning_rate=0.25)
  probe = linear_probe.run(
      probe_config(data_dir, pretrained_export, probe_protocol="sgd", evals__knn__enabled=False,
                   **recipe),
      str(tmp_path / "probe"), mesh=one_device_mesh())
  tuned = finetune.run(
      finetune_config(data_dir, pretrained_export, label_fraction=1.0, **recipe),
      str(tmp_path / "finetune"), mesh=one_device_mesh())
  numbers = (f"fine-tuned {tuned['top1']:.3f}, SGD probe {probe['top1']:.3f}, L-BFGS probe "
             f"{probe_results['pretrained']['top1']:.3f}")
  assert tuned["top1"] >= probe["top1"] + FINETUNE_MARGIN, numbers
  assert tuned["num_labeled_examples"] == 1000 and tuned["label_subset_hash"] == "all"
  for picture in (classification.PREDICTIONS_FILE, classification.CONFUSION_MATRIX_FILE):
    assert os.path.exists(tmp_path / "finetune" / picture)


def test_sgd_probe_gives_the_same_accuracy_on_1_and_8_devices(data_dir, pretrained_export,
                                                              tmp_path):
  results, heads = [], []
  for name, mesh in (("one", one_device_mesh()), ("eight", None)):
    workdir = str(tmp_path / name)
    config = probe_config(data_dir, pretrained_export, probe_protocol="sgd", num_train_steps=20,
                          global_batch_size=64, evals__knn__enabled=False, eval_every_steps=6,
                          train_split="train[:512]", eval_split="test[:256]",
                          optimizer__base_learning_rate=0.02)
    results.append(linear_probe.run(config, workdir, mesh=mesh))
    heads.append(export.load_encoder(os.path.join(workdir, workdir_files.EXPORT_DIR))
                 .params["supervised_head"]["dense"]["kernel"])
  assert results[0]["num_devices"] == 1 and results[1]["num_devices"] == 8
  assert results[0]["top1"] > 0.2  # it learned something, so equal accuracies mean something
  for name in ("top1", "top5", "mean_per_class_accuracy"):
    assert results[0][name] == results[1][name]
  assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
  np.testing.assert_allclose(heads[0], heads[1], rtol=1e-4, atol=1e-6)


def test_finetuning_above_a_block_moves_only_the_layers_above_it(data_dir, random_export,
                                                                 tmp_path):
  config = finetune_config(data_dir, random_export, fine_tune_after_block=2, label_fraction=1.0,
                           labels_per_class=8, num_train_steps=6, eval_every_steps=0,
                           global_batch_size=32)
  results = finetune.run(config, str(tmp_path), mesh=one_device_mesh())
  assert results["fine_tune_after_block"] == 2 and results["from_scratch"] == 0
  assert results["num_labeled_examples"] == 80 and results["labels_per_class"] == 8
  with open(tmp_path / finetune.LABEL_SUBSET_FILE) as f:
    recorded = json.load(f)
  again = input_pipeline.label_subset(DATASET, data_dir=data_dir, split=TRAIN_SPLIT, per_class=8,
                                      seed=config.seed)
  assert recorded["indices"] == again.tolist()
  assert recorded["label_subset_hash"] == results["label_subset_hash"]

  tuned = export.load_encoder(str(tmp_path / workdir_files.EXPORT_DIR))
  original = export.load_encoder(random_export)
  for collection in ("params", "batch_stats"):
    original_encoder = getattr(original, collection)["encoder"]
    for layer, value in getattr(tuned, collection)["encoder"].items():
      same = jax.tree.leaves(jax.tree.map(np.array_equal, value, original_encoder[layer]))
      if finetune.encoder_stage(layer) <= 2:
        assert all(same), f"{collection}/{layer} moved although frozen"
      elif layer == "block4_1":
        assert not all(same), f"{collection}/{layer} did not train"


@pytest.fixture(scope="module")
def budgeted_supervised_run(data_dir, tmp_path_factory):
  """The smoke supervised baseline (random init) under a 3-second budget: (workdir, config,
  results). Compiling the first step alone takes about that long, so it stops within a few
  dozen steps of its 1000 (how many depends on the machine), before its first periodic
  checkpoint."""
  workdir = tmp_path_factory.mktemp("supervised")
  config = set_fields(cifar10_finetune.get_config("smoke_scratch"), data_dir=data_dir,
                      train_split=TRAIN_SPLIT, eval_split=SMALL_EVAL_SPLIT, num_train_steps=1000,
                      eval_every_steps=0, checkpoint_every_steps=1000, max_train_minutes=0.05)
  return workdir, config, finetune.run(config, str(workdir), mesh=one_device_mesh())


def test_time_budget_stops_training_with_checkpoint_export_and_results(budgeted_supervised_run):
  workdir, config, results = budgeted_supervised_run
  step = results["step"]
  assert results["stopped_early_by_time_budget"] and 1 <= step < 500, results
  assert results["num_train_steps"] == 1000
  assert results["from_scratch"] == 1 and results["num_labeled_examples"] == 100
  assert results["epochs"] == pytest.approx(step * config.global_batch_size / 100)
  assert np.isfinite(results["loss"])
  assert os.listdir(workdir / workdir_files.CHECKPOINT_DIR) == [str(step)]
  with open(workdir / workdir_files.RESULTS_FILE) as f:
    assert json.load(f) == results
  exported = export.load_encoder(str(workdir / workdir_files.EXPORT_DIR))
  assert set(exported.params) == {"encoder", models.SUPERVISED_HEAD}


def test_a_run_the_budget_stopped_is_continued_not_returned(tmp_path):
  """A rerun continues a budget-stopped run (from its checkpoint), with any budget."""
  config = cifar10_finetune.get_config("smoke")
  workdir_files.write_config(str(tmp_path), config)
  results = {"top1": 0.5, "step": 3, "stopped_early_by_time_budget": False}
  workdir_files.write_results(str(tmp_path), results)
  assert workdir_files.finished_results(str(tmp_path), config) == results
  workdir_files.write_results(str(tmp_path), dict(results, stopped_early_by_time_budget=True))
  assert workdir_files.finished_results(str(tmp_path), config) is None
  config.max_train_minutes = 10.0
  assert workdir_files.finished_results(str(tmp_path), config) is None
  workdir_files.write_results(str(tmp_path), results)
  with pytest.raises(ValueError, match="another config"):
    workdir_files.finished_results(str(tmp_path), config)
  # A pretraining run continues on a longer schedule instead (its checkpoint record decides).
  assert workdir_files.finished_results(str(tmp_path), config, continuable=True) is None


def test_probe_starts_from_the_export_of_a_supervised_run(budgeted_supervised_run, data_dir,
                                                          tmp_path):
  """Fine-tuning exports its encoder as pretraining does, so a probe can evaluate it."""
  workdir = budgeted_supervised_run[0]
  config = probe_config(data_dir, str(workdir), probe_protocol="lbfgs", evals__knn__enabled=False,
                        train_split="train[:200]", eval_split=SMALL_EVAL_SPLIT,
                        lbfgs__l2_num=3)
  results = linear_probe.run(config, str(tmp_path), mesh=one_device_mesh())
  assert results["num_train_examples"] == 200 and 0.0 <= results["top1"] <= 1.0
  tuned = export.load_encoder(str(workdir / workdir_files.EXPORT_DIR))
  probed = export.load_encoder(str(tmp_path / workdir_files.EXPORT_DIR))
  jax.tree.map(np.testing.assert_array_equal, probed.params["encoder"], tuned.params["encoder"])
  assert probed.metadata["init_from"] == str(workdir)


@pytest.mark.parametrize("get_config,field,value,message", [
    (lambda: cifar10_finetune.get_config("smoke"), "max_train_minutes", -1.0,
     "max_train_minutes=-1.0 must be >= 0"),
    (lambda: cifar10_linear_probe.get_config("smoke"), "max_train_minutes", -0.5,
     "max_train_minutes=-0.5 must be >= 0"),
    (lambda: cifar10_finetune.get_config("smoke"), "optimizer__name", "adam",
     "optimizer.name='adam'; allowed"),
])
def test_bad_training_fields_are_clear_errors(get_config, field, value, message, tmp_path):
  config = set_fields(get_config(), init_from=str(tmp_path), **{field: value})
  run = finetune.run if config.mode == "finetune" else linear_probe.run
  with pytest.raises(ValueError, match=re.escape(message)):
    run(config, str(tmp_path))


def test_cpu_supervised_recipe_is_the_baseline_of_the_cpu_pretraining():
  supervised_config = cifar10_finetune.get_config("cpu_supervised")
  pretraining = cifar10_pretrain.get_config("cpu")
  assert supervised_config.model == pretraining.model
  assert supervised_config.from_scratch and not supervised_config.init_from
  assert supervised_config.label_fraction == 1.0 and supervised_config.global_batch_size == 128
  assert supervised_config.augment.preset == "crop_flip" and not supervised_config.augment.ops
  assert supervised_config.optimizer.nesterov and supervised_config.optimizer.weight_decay == 5e-4
  assert supervised_config.conv_backend == pretraining.conv_backend
  # Both runs get the same 25 minutes, and in both the budget, not the schedule, ends the run: at
  # the fastest rates measured on 2 cores (supervised 384 images/s, pretraining 320 pairs/s; see
  # experiments/results/cifar10_cpu_25min.md) each schedule is longer than the budget covers. The
  # supervised_config run still evaluates on the way.
  assert supervised_config.max_train_minutes == pretraining.max_train_minutes == 25

  def steps_in_budget(config, measured_examples_per_second):
    return config.max_train_minutes * 60 * measured_examples_per_second // config.global_batch_size

  for config, measured_examples_per_second in ((supervised_config, 384), (pretraining, 320)):
    steps = optim.steps_from_epochs(config.num_epochs, 50_000, config.global_batch_size)
    assert steps_in_budget(config, measured_examples_per_second) < steps
  assert steps_in_budget(supervised_config, 384) // supervised_config.eval_every_steps >= 2


def test_frozen_check_catches_a_changed_encoder():
  before = {"encoder": {"stem_conv": {"kernel": np.zeros((3, 3, 3, 4), np.float32)}}}
  after = {"encoder": {"stem_conv": {"kernel": np.full((3, 3, 3, 4), 1e-7, np.float32)}}}
  with pytest.raises(RuntimeError, match="stem_conv"):
    supervised.assert_unchanged(before, after, "encoder variables")
  supervised.assert_unchanged(before, jax.tree.map(np.copy, before), "encoder variables")


# ------------------------------------------------------------------------------------------------
# Clear errors.


def test_missing_export_is_a_clear_error(data_dir, tmp_path):
  config = probe_config(data_dir, str(tmp_path / "no_such_export"))
  with pytest.raises(FileNotFoundError, match="not an encoder export"):
    linear_probe.run(config, str(tmp_path / "work"))


def test_empty_init_from_is_a_clear_error(data_dir, tmp_path):
  with pytest.raises(ValueError, match="init_from is empty"):
    linear_probe.run(probe_config(data_dir, ""), str(tmp_path))
  with pytest.raises(ValueError, match="from_scratch=True"):
    finetune.run(finetune_config(data_dir, ""), str(tmp_path))


def test_corrupt_export_is_a_clear_error(data_dir, random_export, tmp_path):
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / export.MODEL_CONFIG_FILE).write_text("{not json")
  (corrupt / export.VARIABLES_DIR).mkdir()
  with pytest.raises(ValueError, match="corrupt"):
    linear_probe.run(probe_config(data_dir, str(corrupt)), str(tmp_path / "work"))


def test_architecture_mismatch_is_a_clear_error(data_dir, random_export, tmp_path):
  config = probe_config(data_dir, random_export, model__width_multiplier=0.25,
                        model__cifar_stem=False)
  with pytest.raises(ValueError, match="width_multiplier: config.model has 0.25, the export has "
                     "0.125; cifar_stem"):
    linear_probe.run(config, str(tmp_path))


def test_missing_projection_head_layer_is_a_clear_error(data_dir, random_export, tmp_path):
  config = probe_config(data_dir, random_export, projection_layer=4)
  with pytest.raises(ValueError, match="projection_layer=4"):
    linear_probe.run(config, str(tmp_path))


class UnlabelledImages(tfds.core.GeneratorBasedBuilder):
  """A dataset of images without labels (like an unlabelled split or a generative benchmark)."""
  VERSION = tfds.core.Version("1.0.0")
  pkg_dir_path = epath.Path(__file__).parent  # TFDS cannot infer it for a test module

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(8, 8, 3))}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(), "test": self._generate_examples()}

  def _generate_examples(self):
    for index in range(4):
      yield index, {"image": np.full((8, 8, 3), index, np.uint8)}


def test_dataset_without_labels_is_a_clear_error(random_export, tmp_path):
  data_dir = str(tmp_path / "tfds")
  UnlabelledImages(data_dir=data_dir).download_and_prepare()
  config = probe_config(data_dir, random_export, dataset="unlabelled_images",
                        train_split="train", eval_split="test")
  with pytest.raises(ValueError, match="not an image-classification dataset"):
    linear_probe.run(config, str(tmp_path / "probe"))
  config = finetune_config(data_dir, random_export, dataset="unlabelled_images",
                           train_split="train", eval_split="test")
  with pytest.raises(ValueError, match="not an image-classification dataset"):
    finetune.run(config, str(tmp_path / "finetune"))


def test_imagenette_baselines_and_probes_describe_the_pretrained_network():
  pretraining = imagenette_pretrain.get_config("cpu")
  supervised_config = imagenette_finetune.get_config("cpu_supervised")
  assert supervised_config.from_scratch and supervised_config.label_fraction == 1.0
  assert supervised_config.max_train_minutes == pretraining.max_train_minutes == 25
  for config in (supervised_config, imagenette_linear_probe.get_config("cpu"),
                 imagenette_linear_probe.get_config("cifar10_cpu")):
    assert config.model == pretraining.model
    assert config.image_size == pretraining.image_size  # the size the encoder was trained at
    assert config.conv_backend == pretraining.conv_backend
  assert imagenette_linear_probe.get_config("cpu").probe_protocol == "lbfgs"
  assert imagenette_linear_probe.get_config("cpu").dataset == pretraining.dataset


@pytest.mark.parametrize("module,variants", [
    (cifar10_linear_probe, ["r18", "r18_lbfgs", "cpu", "smoke"]),
    (cifar10_finetune, ["100pct", "10pct", "1pct", "100pct_scratch", "10pct_scratch",
                        "1pct_scratch", "cpu", "cpu_supervised", "smoke", "smoke_scratch"]),
    (transfer_linear_probe, ["cifar100", "tf_flowers", "imagenette", "stl10", "smoke"]),
    (imagenet_linear_probe, ["r50", "r50_lbfgs", "smoke"]),
    (imagenet_finetune, ["1pct", "10pct", "100pct", "1pct_scratch", "smoke"]),
    (imagenette_linear_probe, ["cpu", "cifar10_cpu", "smoke"]),
    (imagenette_finetune, ["cpu_supervised", "smoke"]),
])
def test_recipes_build_and_name_their_variants(module, variants):
  for variant in variants:
    config = module.get_config(variant)
    assert config.mode in ("linear_probe", "finetune")
    models.ModelConfig.from_mapping(config.model)
  with pytest.raises(ValueError, match="allowed"):
    module.get_config("no_such_variant")
