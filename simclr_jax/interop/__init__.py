"""Interoperability: the official TF1 checkpoints in, PyTorch-readable safetensors out."""
