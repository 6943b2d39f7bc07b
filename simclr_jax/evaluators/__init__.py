"""Evaluation of encoder exports: linear probes (SGD or L-BFGS), fine-tuning, shared outputs."""
