"""Datasets that ship with the package, generated from code (no download)."""
