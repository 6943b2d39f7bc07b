"""LARS equals the official update rule; masks, schedules, LR scaling and freezing."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import optim


def small_params():
  """A tree named like the models: conv kernel, BN scale/bias, dense kernel/bias, linear head."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
      "encoder": {
          "stem_conv": {"kernel": normal(3, 3, 3, 4)},
          "stem_bn": {"scale": normal(4), "bias": normal(4)},
          "block1_0": {"conv1": {"kernel": normal(3, 3, 4, 4)},
                       "bn1": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)}},
      },
      "projection_head": {
          "dense_0": {"kernel": jnp.zeros((4, 6)), "bias": normal(6)},  # zero: trust ratio 1
          "bn_0": {"scale": normal(6), "bias": normal(6)},
      },
      "linear_head": {"dense": {"kernel": normal(4, 3), "bias": normal(3)}},
  }


DECAYED = {"encoder/stem_conv/kernel", "encoder/block1_0/conv1/kernel",
           "projection_head/dense_0/kernel"}


def flatten(tree):
  return {"/".join(key.key for key in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def gradients(step):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                      small_params())


def test_decay_mask_picks_exactly_the_conv_and_dense_kernels():
  mask = flatten(optim.decay_mask(small_params()))
  assert {name for name, decayed in mask.items() if decayed} == DECAYED
  assert len(mask) == 12


def reference_lars(params, grads_per_step, *, learning_rate, weight_decay, momentum,
                   trust_coefficient):
  """The official SimCLR LARS rule in float64 NumPy, one leaf at a time; returns all updates."""
  params = {name: np.asarray(value, np.float64) for name, value in flatten(params).items()}
  velocity = {name: np.zeros_like(value) for name, value in params.items()}
  updates_per_step = []
  for grads in grads_per_step:
    updates = {}
    for name, w in params.items():
      g = np.asarray(flatten(grads)[name], np.float64)
      trust = 1.0
      if name in DECAYED:
        g = g + weight_decay * w
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        if w_norm > 0 and g_norm > 0:
          trust = trust_coefficient * w_norm / g_norm
      velocity[name] = momentum * velocity[name] + learning_rate * trust * g
      updates[name] = -velocity[name]
      params[name] = w - velocity[name]
    updates_per_step.append(updates)
  return params, updates_per_step


def test_three_lars_steps_equal_the_official_rule():
  hyper = dict(learning_rate=0.1, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
  optimizer = optim.create_optimizer("lars", hyper["learning_rate"],
                                     weight_decay=hyper["weight_decay"])
  params = small_params()
  state = optimizer.init(params)
  grads_per_step = [gradients(step) for step in range(3)]
  expected_params, expected_updates = reference_lars(small_params(), grads_per_step, **hyper)
  update = jax.jit(optimizer.update)
  for grads, expected in zip(grads_per_step, expected_updates):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for name, value in flatten(updates).items():  # updates: relative, so tiny LARS steps count
      np.testing.assert_allclose(value, expected[name], rtol=2e-5, atol=1e-9, err_msg=name)
  for name, value in flatten(params).items():
    np.testing.assert_allclose(value, expected_params[name], rtol=0, atol=1e-6, err_msg=name)


def test_sgd_adds_masked_weight_decay_and_nesterov_momentum():
  params, grads = small_params(), gradients(0)
  optimizer = optim.create_optimizer("sgd", 0.1, weight_decay=0.01, momentum=0.9, nesterov=True)
  state = optimizer.init(params)
  for _ in range(2):  # optax trace: v = g + m v; Nesterov update -lr (g + m v)
    updates, state = jax.jit(optimizer.update)(grads, state, params)
  for name, value in flatten(updates).items():
    g = flatten(grads)[name] + (0.01 * flatten(params)[name] if name in DECAYED else 0.0)
    np.testing.assert_allclose(value, -0.1 * (g + 0.9 * (g + 0.9 * g)), rtol=1e-5, err_msg=name)


def test_adamw_decays_only_the_masked_leaves():
  params = small_params()
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  optimizer = optim.create_optimizer("adamw", 0.1, weight_decay=0.01)
  updates, _ = jax.jit(optimizer.update)(zero_grads, optimizer.init(params), params)
  for name, value in flatten(updates).items():
    expected = -0.1 * 0.01 * flatten(params)[name] if name in DECAYED else 0.0
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=0, err_msg=name)


@pytest.mark.parametrize("optimizer_name", optim.OPTIMIZERS)
@pytest.mark.parametrize("as_function", [False, True])
def test_trainable_mask_freezes_leaves_and_keeps_the_rest(optimizer_name, as_function):
  params = small_params()
  grads_per_step = [gradients(step) for step in range(2)]
  mask = {"encoder": False, "projection_head": True, "linear_head": True}  # a prefix tree
  frozen = optim.create_optimizer(optimizer_name, 0.5, weight_decay=0.1,
                                  trainable_mask=(lambda _: mask) if as_function else mask)
  plain = optim.create_optimizer(optimizer_name, 0.5, weight_decay=0.1)
  frozen_state, plain_state = frozen.init(params), plain.init(params)
  for grads in grads_per_step:
    frozen_updates, frozen_state = jax.jit(frozen.update)(grads, frozen_state, params)
    plain_updates, plain_state = jax.jit(plain.update)(grads, plain_state, params)
  for name, value in flatten(frozen_updates).items():
    if name.startswith("encoder/"):
      assert not np.any(value), name
    else:  # the trainable part sees the same decay/trust masks as without freezing
      np.testing.assert_allclose(value, flatten(plain_updates)[name], rtol=1e-6, err_msg=name)
  assert np.any(flatten(frozen_updates)["projection_head/dense_0/kernel"])


def test_schedule_warms_up_linearly_then_decays_to_zero_by_cosine():
  schedule = optim.learning_rate_schedule(0.3, lr_scaling="linear", global_batch_size=512,
                                          total_steps=100, warmup_steps=10)
  peak = 0.3 * 512 / 256
  values = np.asarray(schedule(jnp.arange(121)))  # the schedule is vectorised over steps
  expected = {0: 0.0, 5: peak / 2, 10: peak, 55: peak / 2, 100: 0.0, 120: 0.0}
  for step, value in expected.items():
    np.testing.assert_allclose(values[step], value, rtol=1e-6, atol=1e-7, err_msg=str(step))
  steps = np.arange(10, 101)
  closed_form = peak * 0.5 * (1 + np.cos(np.pi * (steps - 10) / 90))
  np.testing.assert_allclose(values[10:101], closed_form, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(values[:10], peak * np.arange(10) / 10, rtol=1e-6)
  no_warmup = optim.learning_rate_schedule(1.0, lr_scaling="sqrt", global_batch_size=16,
                                           total_steps=10, warmup_steps=0)
  np.testing.assert_allclose(no_warmup(0), 4.0)


def test_learning_rate_scaling():
  assert optim.scale_learning_rate(0.3, "linear", 4096) == pytest.approx(4.8)
  assert optim.scale_learning_rate(0.075, "sqrt", 4096) == pytest.approx(4.8)
  assert optim.scale_learning_rate(0.3, "linear", 256) == pytest.approx(0.3)
  assert optim.scale_learning_rate(0.075, "sqrt", 256) == pytest.approx(1.2)
  assert optim.scale_learning_rate(0.1, "none", 4096) == pytest.approx(0.1)


def test_probe_optimizer_steps_only_the_linear_head_and_lars_the_rest():
  params = {"encoder": {"conv": {"kernel": jnp.full((3, 3), 2.0)}},
            "linear_head": {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  lars = optim.create_optimizer("lars", 1.0, weight_decay=0.0, momentum=0.0)
  probe = optim.create_optimizer("sgd", 0.1, weight_decay=0.0, momentum=0.0)
  updates, _ = optim.with_probe_optimizer(lars, probe).update(
      grads, optim.with_probe_optimizer(lars, probe).init(params), params)
  # Plain SGD on the head: -lr * g.
  np.testing.assert_allclose(updates["linear_head"]["dense"]["kernel"], -0.05)
  np.testing.assert_allclose(updates["linear_head"]["dense"]["bias"], -0.05)
  # LARS on the kernel: -lr * trust * g with trust = 0.001 * |w| / |g| = 0.001 * 2 / 0.5.
  np.testing.assert_allclose(updates["encoder"]["conv"]["kernel"], -0.001 * 4 * 0.5, rtol=1e-6)


def test_steps_from_epochs():
  assert optim.steps_from_epochs(100, 50_000, 512) == math.ceil(100 * 50_000 / 512) == 9766
  assert optim.steps_from_epochs(10, 50_000, 512) == 977
  assert optim.steps_from_epochs(0.5, 1000, 100) == 5
  assert optim.steps_from_epochs(0, 1000, 100) == 0


@pytest.mark.parametrize("call,message", [
    (lambda: optim.create_optimizer("adam", 0.1, weight_decay=0.0),
     "unknown optimizer 'adam'; allowed: lars, sgd, adamw"),
    (lambda: optim.create_optimizer("lars", -0.1, weight_decay=0.0),
     "learning_rate must be >= 0, got -0.1"),
    (lambda: optim.create_optimizer("sgd", 0.1, weight_decay=-1e-4), "got -0.0001"),
    (lambda: optim.create_optimizer("sgd", 0.1, weight_decay=0.0, momentum=1.0),
     r"momentum must be in \[0, 1\), got 1.0"),
    (lambda: optim.create_optimizer("lars", 0.1, weight_decay=0.0, trust_coefficient=0.0),
     "trust_coefficient must be positive"),
    (lambda: optim.scale_learning_rate(0.3, "cubic", 256),
     "unknown lr_scaling 'cubic'; allowed: linear, sqrt, none"),
    (lambda: optim.scale_learning_rate(-0.3, "linear", 256), "got -0.3"),
    (lambda: optim.scale_learning_rate(0.3, "linear", 0), "global_batch_size must be positive"),
    (lambda: optim.learning_rate_schedule(0.3, lr_scaling="linear", global_batch_size=256,
                                          total_steps=100, warmup_steps=101),
     r"warmup_steps must be in \[0, total_steps=100\), got 101"),
    (lambda: optim.learning_rate_schedule(0.3, lr_scaling="linear", global_batch_size=256,
                                          total_steps=0, warmup_steps=0),
     "total_steps must be positive, got 0"),
    (lambda: optim.steps_from_epochs(-1, 100, 10), "epochs must be >= 0, got -1"),
    (lambda: optim.steps_from_epochs(1, 0, 10), "got 0 and 10"),
])
def test_bad_values_are_rejected_with_clear_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()
