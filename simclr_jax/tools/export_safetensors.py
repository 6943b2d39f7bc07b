r"""Writes an encoder export as PyTorch-loadable safetensors plus an architecture JSON.

  python -m simclr_jax.tools.export_safetensors --init_from=WORKDIR --out=DIR

Then, in PyTorch: `safetensors.torch.load_file('DIR/model.safetensors')` into a ResNet built from
`DIR/model.json` (torchvision names; see simclr_jax/torch_export.py for the mapping).
"""
from absl import app
from absl import flags

from simclr_jax.interop import torch_export

_INIT_FROM = flags.DEFINE_string("init_from", None, "Encoder export directory (model.json + "
                                 "variables/) or a run's workdir holding one in export/.")
_OUT = flags.DEFINE_string("out", None, "Output directory for model.safetensors and model.json.")
flags.mark_flags_as_required(["init_from", "out"])


def main(argv):
  del argv
  tensors_path, description_path = torch_export.export_safetensors(_INIT_FROM.value, _OUT.value)
  print(f"wrote {tensors_path} and {description_path}")


if __name__ == "__main__":
  app.run(main)
