r"""Prediction grid (and confusion matrix) of a trained classifier on any labelled dataset.

  python -m simclr_jax.tools.predict --init_from=WORKDIR_OF_A_PROBE_OR_FINETUNE \
      --dataset=tf_flowers --data_dir=DIR --split='train[80%:]' --out=predictions.png

`--init_from` is a linear-probe or fine-tune workdir (its export/ holds the encoder and the trained
linear head), that export itself, or any encoder export with a supervised head (e.g. a converted
SimCLRv2 checkpoint). Images come from the eval pipeline (centre crop, resize to the export's
image size); class names from the dataset's TFDS info. Correct predictions are green, wrong red.
"""
from absl import app
from absl import flags
import numpy as np

from simclr_jax import export
from simclr_jax import features
from simclr_jax import input_pipeline
from simclr_jax import sharding
from simclr_jax.visualize import predictions as prediction_plots

_INIT_FROM = flags.DEFINE_string("init_from", None, "Probe/fine-tune workdir or an export with a "
                                 "supervised head.")
_DATASET = flags.DEFINE_string("dataset", None, "TFDS name, synthetic_shapes, or folder:/path.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: TFDS's own).")
_SPLIT = flags.DEFINE_string("split", "test", "Split spec, e.g. test or 'train[80%:]'.")
_OUT = flags.DEFINE_string("out", "predictions.png", "Output PNG of the prediction grid.")
_CONFUSION_MATRIX = flags.DEFINE_string(
    "confusion_matrix", "", "Also write the confusion matrix over the whole split to this PNG.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 32, "Images in the grid (the split's first).")
_COLUMNS = flags.DEFINE_integer("columns", 8, "Grid columns.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Input size; 0 = the export's.")
_PROJECTION_LAYER = flags.DEFINE_integer(
    "projection_layer", -1, "Representation under the head; -1 = as recorded in the export.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per forward pass (rounded up to a "
                                   "multiple of the device count).")
flags.mark_flags_as_required(["init_from", "dataset"])


def predict(init_from: str, dataset: str, *, data_dir: str | None, split: str, out: str,
            num_images: int = 32, columns: int = 8, image_size: int = 0,
            projection_layer: int | None = None, batch_size: int = 64,
            confusion_matrix: str = "") -> dict:
  """Writes the PNG(s); returns {'top1': accuracy over the images used, 'num_examples': ...}."""
  if num_images < 1:
    raise ValueError(f"num_images must be >= 1, got {num_images}")
  classifier, variables, encoder_export = export.load_classifier_export(
      init_from, projection_layer=projection_layer)
  image_size = image_size or int(encoder_export.metadata.get("image_size", 0))
  if image_size <= 0:
    raise ValueError(f"the export {init_from} does not record its image size: pass --image_size")
  info = input_pipeline.get_dataset_info(dataset, data_dir=data_dir)
  if info.num_classes != classifier.num_classes:
    raise ValueError(
        f"the classifier in {init_from} predicts {classifier.num_classes} classes (trained on "
        f"{encoder_export.metadata.get('dataset', 'an unrecorded dataset')!r}) but {dataset!r} has "
        f"{info.num_classes}: use a probe or fine-tune trained on {dataset!r}")
  mesh = sharding.create_mesh()
  num_devices = mesh.devices.size
  global_batch_size = -(-batch_size // num_devices) * num_devices
  batches = input_pipeline.create_eval_iterator(
      dataset, data_dir=data_dir, split=split, global_batch_size=global_batch_size,
      image_size=image_size, mesh=mesh)
  evaluated = features.run_over_dataset(
      features.sharded_apply(lambda v, images: classifier.apply(v, images, train=False)[0], mesh),
      variables, batches, keep_images=num_images,
      max_examples=0 if confusion_matrix else num_images)
  logits, labels = evaluated["outputs"], evaluated["labels"]
  shown = len(evaluated["images"])
  probabilities = np.exp(logits[:shown] - logits[:shown].max(axis=1, keepdims=True))
  probabilities /= probabilities.sum(axis=1, keepdims=True)
  prediction_plots.plot_prediction_grid(
      evaluated["images"], labels[:shown], logits[:shown].argmax(axis=1), info.class_names, out,
      confidences=probabilities.max(axis=1), columns=columns, title=f"{dataset} {split}")
  if confusion_matrix:
    prediction_plots.plot_confusion_matrix(labels, logits.argmax(axis=1), info.class_names,
                                           confusion_matrix, title=f"{dataset} {split}")
  used = slice(None) if confusion_matrix else slice(0, shown)
  return {"top1": float(np.mean(logits[used].argmax(axis=1) == labels[used])),
          "num_examples": int(len(labels[used]))}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = predict(
      _INIT_FROM.value, _DATASET.value, data_dir=_DATA_DIR.value, split=_SPLIT.value,
      out=_OUT.value, num_images=_NUM_IMAGES.value, columns=_COLUMNS.value,
      image_size=_IMAGE_SIZE.value,
      projection_layer=None if _PROJECTION_LAYER.value < 0 else _PROJECTION_LAYER.value,
      batch_size=_BATCH_SIZE.value, confusion_matrix=_CONFUSION_MATRIX.value)
  written = _OUT.value + (f" and {_CONFUSION_MATRIX.value}" if _CONFUSION_MATRIX.value else "")
  print(f"wrote {written}: top-1 {100 * result['top1']:.1f}% on {result['num_examples']} images")


if __name__ == "__main__":
  app.run(main)
