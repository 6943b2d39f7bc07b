"""Building the native kernels and choosing them: config.conv_backend, norm_backend and
augment_backend pick the kernels on the CPU backend ('auto'), fall back to the portable code with
the reason when they cannot run, and refuse what cannot run or does not exist, saying what is
allowed."""
import logging
import os
import re

import jax
import pytest

from simclr_jax import native
from simclr_jax.native import backends, build

# option: (portable backend, native default, another native choice, the allowed ones)
OPTIONS = {
    "conv_backend": ("xla", "onednn", "onednn_bf16", "auto, xla, onednn, onednn_bf16"),
    "norm_backend": ("jax", "native", "native", "auto, jax, native"),
    "augment_backend": ("jax", "native", "native", "auto, jax, native"),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_auto_picks_the_kernels_on_the_cpu_backend(option):
  portable, native_default, other_native, _ = OPTIONS[option]
  assert jax.default_backend() == "cpu"
  assert native.resolve_backend(option, "auto") == native_default
  assert native.resolve_backend(option, portable) == portable
  assert native.resolve_backend(option, other_native) == other_native


@pytest.mark.parametrize("option", OPTIONS)
def test_without_the_kernels_auto_falls_back_and_native_is_refused_with_the_reason(
    option, monkeypatch, caplog):
  portable, native_default, _, _ = OPTIONS[option]
  reason = "no C++ compiler found"
  monkeypatch.setattr(backends.OPTIONS[option].kernels, "unavailable_reason", lambda: reason)
  with caplog.at_level(logging.WARNING):
    assert native.resolve_backend(option, "auto") == portable
  assert f"{option}='auto' uses" in caplog.text and reason in caplog.text
  with pytest.raises(ValueError, match=re.escape(
      f"{option}={native_default!r} cannot run here: {reason}. Use 'auto' or '{portable}'.")):
    native.resolve_backend(option, native_default)


@pytest.mark.parametrize("option", OPTIONS)
def test_off_the_cpu_backend_auto_is_portable_and_native_is_refused(option, monkeypatch, caplog):
  portable, native_default, _, _ = OPTIONS[option]
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with caplog.at_level(logging.WARNING):
    assert native.resolve_backend(option, "auto") == portable
  assert not caplog.text  # nothing to fix: the kernels are for CPUs
  with pytest.raises(ValueError, match="the kernels run on the CPU backend only; this run's is "
                     "'gpu'"):
    native.resolve_backend(option, native_default)


@pytest.mark.parametrize("option", OPTIONS)
def test_unknown_backends_are_refused_with_the_allowed_ones(option):
  allowed = OPTIONS[option][3]
  assert ", ".join(native.backend_choices(option)) == allowed
  with pytest.raises(ValueError, match=re.escape(f"{option}='mkl'; allowed: {allowed}")):
    native.resolve_backend(option, "mkl")


def test_models_take_resolved_backends_only():
  native.check_resolved(conv_backend="onednn_bf16", norm_backend="jax")
  with pytest.raises(ValueError, match=re.escape(
      "conv backend 'auto': 'xla', 'onednn' or 'onednn_bf16' (resolve 'auto' first)")):
    native.check_resolved(conv_backend="auto")
  with pytest.raises(ValueError, match=re.escape(
      "norm backend 'fused': 'jax' or 'native' (resolve 'auto' first)")):
    native.check_resolved(norm_backend="fused")
  with pytest.raises(ValueError, match="unknown backend option 'dtype'; known: conv_backend"):
    native.resolve_backend("dtype", "auto")


def test_a_failing_build_says_why_and_leaves_nothing_behind(monkeypatch, tmp_path):
  monkeypatch.setenv("SIMCLR_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(build, "SOURCE_DIR", str(tmp_path))
  (tmp_path / "broken.cc").write_text("this is not C++\n")
  with pytest.raises(native.NativeUnavailable, match="building broken.cc failed"):
    build.build_library("broken.cc", [])
  assert os.listdir(tmp_path / "native") == []
  monkeypatch.setenv("CXX", "no-such-compiler")
  monkeypatch.setenv("PATH", "")
  with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler found"):
    build.build_library("broken.cc", [])


def test_the_build_is_cached_by_source(monkeypatch, tmp_path):
  monkeypatch.setenv("SIMCLR_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(build, "SOURCE_DIR", str(tmp_path))
  source = tmp_path / "answer.cc"
  source.write_text('extern "C" int answer() { return 42; }\n')
  first = build.build_library("answer.cc", [])
  assert build.build_library("answer.cc", []) == first
  source.write_text('extern "C" int answer() { return 43; }\n')
  second = build.build_library("answer.cc", [])
  assert second != first and sorted(os.listdir(tmp_path / "native")) == sorted(
      os.path.basename(path) for path in (first, second))
