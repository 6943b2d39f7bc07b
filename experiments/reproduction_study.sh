#!/usr/bin/env bash
# The reproduction study (experiments/results/reproduction_study.md): why a SimCLR reproduction on
# CIFAR reached 6.9%, which extra augmentations help, and LARS vs SGD vs AdamW, on real CIFAR-10.
#
#   bash experiments/reproduction_study.sh [why|augmentations|learning_rates|optimizers|...] [SEEDS]
#
# Every run starts from configs/cifar10_pretrain.py:cpu and trains the same number of epochs
# (EPOCHS, 1.28 = 500 steps of 128 pairs: about 3 minutes on 2 idle cores), so runs of one
# network cost the same wall-clock time whatever else shares the machine; each ends with the same
# evaluation: weighted k-NN and the L-BFGS linear probe on all 50k train / 10k test images.
# Resumable: re-running skips finished runs (experiments/sweep.py). SEEDS=0 runs one seed.
# Environment: DATA_DIR (TFDS data_dir holding cifar10), ROOT (where runs go), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA_DIR=${DATA_DIR:-../shared/data/tfds}
ROOT=${ROOT:-/tmp/reproduction_study}
SEEDS=${SEEDS:-0,1}
EPOCHS=${EPOCHS:-1.28}
RECIPE=configs/cifar10_pretrain.py:cpu

# Every run: the recipe's network and schedule shape, trained for a number of epochs, evaluated
# at the end by the weighted k-NN on all 50k train / 10k test images.
SHARED=(--config="$RECIPE" --set data_dir="$DATA_DIR" --set max_train_minutes=0
  --set schedule_fits_budget=False --set log_every_steps=50 --set checkpoint_every_steps=250
  --set evals.knn.every_steps=0 --set evals.knn.train_examples=0 --set evals.knn.eval_examples=0)
# The study's runs: EPOCHS of training, then also the L-BFGS probe on the same features.
COMMON=("${SHARED[@]}" --set num_epochs="$EPOCHS" --set evals.linear.enabled=True
  --set evals.linear.l2_min=1e-6 --set evals.linear.l2_max=0.1 --set evals.linear.l2_num=11)

BASE='"random_resized_crop","flip","color_jitter","grayscale"'
ALL='"center_crop","random_resized_crop","flip","rotate90","color_jitter","grayscale","cutout","gaussian_noise","sobel"'
# The report's optimizer: plain SGD (Keras' default, no momentum, no weight decay) at 1.0, cosine,
# no warmup, batch 512.
REPORT_OPTIMIZER='optimizer.name=sgd;optimizer.base_learning_rate=1.0;optimizer.lr_scaling=none;optimizer.momentum=0.0;optimizer.weight_decay=0.0;optimizer.warmup_epochs=0.0;global_batch_size=512'

WHY_CASES=(
  --case=recipe
  --case="imagenet_stem:model.cifar_stem=False"
  --case="imagenet_stem_same_time:model.cifar_stem=False;num_train_steps=1750"
  --case="report_optimizer:$REPORT_OPTIMIZER")
REPORT_NETWORK='model.depth=50;model.width_multiplier=1.0;model.cifar_stem=False;image_size=32'
REPORT_NETWORK_CASES=(
  --case="report_network:$REPORT_NETWORK"
  --case="report_network_and_optimizer:$REPORT_OPTIMIZER;$REPORT_NETWORK")
AUGMENTATION_CASES=(
  --case=recipe
  --case="center_crop:augment.ops=(\"center_crop\",$BASE)"
  --case="rotate90:augment.ops=(\"random_resized_crop\",\"flip\",\"rotate90\",\"color_jitter\",\"grayscale\")"
  --case="cutout:augment.ops=($BASE,\"cutout\")"
  --case="gaussian_noise:augment.ops=($BASE,\"gaussian_noise\")"
  --case="sobel:augment.ops=($BASE,\"sobel\")"
  --case="all_extras:augment.ops=($ALL)")

why() {
  # The report's choices one at a time on the recipe's network: an ImageNet stem on small
  # images, its optimizer. The ImageNet stem makes a step ~3.5x cheaper (6x6 maps after it), so
  # it also runs for the recipe's wall-clock time: 3.5x the steps.
  "$PYTHON" experiments/sweep.py ${SWEEP_MODE:---run} "${COMMON[@]}" --root="$ROOT/ablation" \
    --grid=seed="${1:-$SEEDS}" "${WHY_CASES[@]}"
}

report_setup() {
  # The report's whole setup: ResNet-50 with the ImageNet stem on 32 px images, its optimizer at
  # B=512, every extra. One seed by default: its L-BFGS probe of 2048-d features takes ~45 min.
  "$PYTHON" experiments/sweep.py ${SWEEP_MODE:---run} "${COMMON[@]}" --root="$ROOT/ablation" \
    --grid=seed="${1:-0}" \
    --case="report_setup:$REPORT_OPTIMIZER;augment.ops=($ALL);$REPORT_NETWORK"
}

report_network() {
  # Which part of the whole setup fails: the report's network with the recipe's training, and
  # with the report's optimizer (no extras). Judged by k-NN and the contrastive task only (no
  # L-BFGS probe of 2048-d features), in a sweep of their own.
  "$PYTHON" experiments/sweep.py ${SWEEP_MODE:---run} "${SHARED[@]}" --set num_epochs="$EPOCHS" \
    --root="$ROOT/report_network" --grid=seed="${1:-0}" "${REPORT_NETWORK_CASES[@]}"
}

augmentations() {
  # Each extra augmentation of the report alone, and all of them together.
  "$PYTHON" experiments/sweep.py ${SWEEP_MODE:---run} "${COMMON[@]}" --root="$ROOT/ablation" \
    --grid=seed="${1:-$SEEDS}" "${AUGMENTATION_CASES[@]}"
}

mlp_probes() {
  # mlp_probes EXPORT_DIR OUT_PREFIX [model overrides]: the report's MLP probe (3 layers, dropout,
  # Adam, 20 epochs: evaluators/mlp.py) of one encoder, on features taken with batch norm in
  # training mode and on the usual running-average features, each beside the k-NN of the same
  # export. The probe job's own L-BFGS fit is cut to one strong strength (seconds): the study's
  # L-BFGS figures are the pretraining runs'.
  local export=$1 out=$2 batch_norm
  shift 2
  for batch_norm in batch_statistics running_average; do
    [ -f "${out}_$batch_norm/results.json" ] && continue
    "$PYTHON" -m simclr_jax.main --config=configs/cifar10_linear_probe.py:cpu \
      --workdir="${out}_$batch_norm" --config.init_from="$export" --config.data_dir="$DATA_DIR" \
      --config.lbfgs.l2_min=0.1 --config.lbfgs.l2_max=0.1 --config.lbfgs.l2_num=1 \
      --config.evals.mlp.enabled=True --config.evals.mlp.batch_norm="$batch_norm" "$@"
  done
}

report_probe() {
  # The report's probe on the recipe's encoder and on the report setup's, each beside the same
  # network at random init (exported by simclr_jax.tools.export_random_init).
  local seeds=${1:-$SEEDS} seed run
  local resnet50=(--config.model.depth=50 --config.model.width_multiplier=1.0
    --config.model.cifar_stem=False)
  for seed in ${seeds//,/ }; do
    run="$ROOT/ablation/case=recipe,seed=$seed"
    [ -f "$run/results.json" ] && mlp_probes "$run/export" "$run/mlp_probe"
  done
  run="$ROOT/random_init/recipe"
  [ -d "$run/export" ] || "$PYTHON" -m simclr_jax.tools.export_random_init --config="$RECIPE" \
    --workdir="$run" --config.data_dir="$DATA_DIR"
  mlp_probes "$run/export" "$run/mlp_probe"
  for seed in ${seeds//,/ }; do
    run="$ROOT/ablation/case=report_setup,seed=$seed"
    [ -f "$run/results.json" ] && mlp_probes "$run/export" "$run/mlp_probe" "${resnet50[@]}"
  done
  run="$ROOT/random_init/report_setup"
  [ -d "$run/export" ] || "$PYTHON" -m simclr_jax.tools.export_random_init --config="$RECIPE" \
    --workdir="$run" --config.data_dir="$DATA_DIR" "${resnet50[@]}" --config.image_size=32
  mlp_probes "$run/export" "$run/mlp_probe" "${resnet50[@]}"
}

LEARNING_RATES=(
  --case="lars_0.42:optimizer.base_learning_rate=0.0375"
  --case="lars_0.85:optimizer.base_learning_rate=0.075"
  --case="lars_1.7:optimizer.base_learning_rate=0.15"
  --case="sgd_0.03:optimizer.name=sgd;optimizer.lr_scaling=none;optimizer.base_learning_rate=0.03"
  --case="sgd_0.1:optimizer.name=sgd;optimizer.lr_scaling=none;optimizer.base_learning_rate=0.1"
  --case="sgd_0.3:optimizer.name=sgd;optimizer.lr_scaling=none;optimizer.base_learning_rate=0.3"
  --case="adamw_3e-4:optimizer.name=adamw;optimizer.lr_scaling=none;optimizer.base_learning_rate=3e-4"
  --case="adamw_1e-3:optimizer.name=adamw;optimizer.lr_scaling=none;optimizer.base_learning_rate=1e-3"
  --case="adamw_3e-3:optimizer.name=adamw;optimizer.lr_scaling=none;optimizer.base_learning_rate=3e-3"
  --case="adamw_1e-2:optimizer.name=adamw;optimizer.lr_scaling=none;optimizer.base_learning_rate=1e-2")

learning_rates() {
  # The short sweep: each optimizer at three peak learning rates (LARS: the recipe's 0.85, half
  # and twice it; AdamW's best was its largest, so a fourth), 200 steps at B=128, judged by k-NN.
  "$PYTHON" experiments/sweep.py ${SWEEP_MODE:---run} "${SHARED[@]}" --set num_epochs=0.512 \
    --root="$ROOT/learning_rates" --grid=seed=0 "${LEARNING_RATES[@]}"
}


optimizers() {
  # Each optimizer for the whole budget at its best short-sweep rate at B=128 (LARS there is the
  # ablation's `recipe`), and at B=512 with its batch-scaling rule: LARS the recipe's square
  # root (x2), SGD linear (x4), AdamW square root (x2).
  "$PYTHON" experiments/sweep.py ${SWEEP_MODE:---run} "${COMMON[@]}" --root="$ROOT/optimizers" \
    --grid=seed="${1:-0}" \
    --case="sgd_b128:optimizer.name=sgd;optimizer.lr_scaling=none;optimizer.base_learning_rate=0.1" \
    --case="adamw_b128:optimizer.name=adamw;optimizer.lr_scaling=none;optimizer.base_learning_rate=3e-3" \
    --case="lars_b512:global_batch_size=512" \
    --case="sgd_b512:optimizer.name=sgd;optimizer.lr_scaling=none;optimizer.base_learning_rate=0.4;global_batch_size=512" \
    --case="adamw_b512:optimizer.name=adamw;optimizer.lr_scaling=none;optimizer.base_learning_rate=6e-3;global_batch_size=512"
}

tables() {
  # One table (markdown, CSV) and plot per sweep: the ablation averaged over seeds.
  local columns=knn_top1,linear_top1,contrastive_accuracy,loss,num_train_steps,train_seconds
  "$PYTHON" experiments/aggregate.py "$ROOT/ablation" --over=seed --sort=linear_top1 \
    --columns="$columns"
  "$PYTHON" experiments/aggregate.py "$ROOT/learning_rates" --sort=knn_top1 \
    --columns=knn_top1,contrastive_accuracy,loss,train_seconds
  "$PYTHON" experiments/aggregate.py "$ROOT/optimizers" --sort=linear_top1 --columns="$columns"
}

previews() {
  # One picture of the views every augmentation case trained on: each run's own
  # augmentations.png (seed 0), side by side.
  "$PYTHON" - "$ROOT/ablation" "$ROOT/augmentation_previews.png" <<'PYTHON'
import os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
root, out = sys.argv[1:]
cases = ["recipe", "center_crop", "rotate90", "cutout", "gaussian_noise", "sobel", "all_extras"]
paths = [(c, os.path.join(root, f"case={c},seed=0", "augmentations.png")) for c in cases]
paths = [(c, p) for c, p in paths if os.path.exists(p)]
figure, axes = plt.subplots(1, len(paths), figsize=(4.2 * len(paths), 6), squeeze=False)
for axis, (case, path) in zip(axes[0], paths):
  axis.imshow(plt.imread(path))
  axis.set_title(case, fontsize=14)
  axis.axis("off")
figure.tight_layout()
figure.savefig(out, dpi=50)
print(f"wrote {out}")
PYTHON
}

all() {
  why; report_setup; report_network; augmentations; report_probe; learning_rates; optimizers
  tables; previews
}

"${@:-all}"
