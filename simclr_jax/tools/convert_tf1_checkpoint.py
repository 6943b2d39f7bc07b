"""Converts an official SimCLR v1/v2 TF1 checkpoint into a simclr_jax encoder export.

  python -m simclr_jax.tools.convert_tf1_checkpoint \
      --checkpoint=r50_1x_sk0/model.ckpt-250228 --out=exports/simclrv2_r50_1x_sk0

Depth, width and the selective-kernel ratio are read off the checkpoint; pass them only to check
a checkpoint against a known architecture. The export is what `config.init_from` takes.
"""
from absl import app
from absl import flags
from absl import logging

from simclr_jax.interop import convert_tf1

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "TF1 checkpoint prefix (DIR/model.ckpt-N) or a directory holding one.",
    required=True)
_OUT = flags.DEFINE_string("out", None, "New directory for the encoder export.", required=True)
_DEPTH = flags.DEFINE_integer("depth", None, "ResNet depth; inferred when unset.")
_WIDTH = flags.DEFINE_float("width", None, "Width multiplier; inferred when unset.")
_SK_RATIO = flags.DEFINE_float("sk_ratio", None, "Selective-kernel ratio; inferred when unset.")
_SUPERVISED_HEAD_INPUT = flags.DEFINE_enum(
    "supervised_head_input", "h", convert_tf1.SUPERVISED_HEAD_INPUTS,
    "What the supervised head reads: 'h' (pretrained, SimCLRv1, supervised checkpoints) or "
    "'hidden1' (SimCLRv2 finetuned_*/distill_*, trained with --ft_proj_selector=1).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of the save at INFO
  conversion = convert_tf1.convert_checkpoint(
      _CHECKPOINT.value, _OUT.value, depth=_DEPTH.value, width_multiplier=_WIDTH.value,
      sk_ratio=_SK_RATIO.value, supervised_head_input=_SUPERVISED_HEAD_INPUT.value)
  heads = ["projection head"] if conversion.has_projection_head else []
  if conversion.num_classes:
    heads.append(f"supervised head ({conversion.num_classes} classes)")
  print(f"converted {conversion.checkpoint_prefix}: {len(conversion.assignments)} tensors "
        f"({len(conversion.skipped)} EMA/optimizer/step tensors skipped)")
  print(f"model: {conversion.model_config.to_dict()}")
  print(f"heads: {', '.join(heads) or 'none'}")
  print(f"export written to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
