"""Two pretraining updates of a whole ResNet equal the official code's, computed independently.

Our side: `jobs.pretrain.make_loss_fn` (NT-Xent + the online probe) differentiated by JAX, stepped
by `optim.create_optimizer('lars', ...)`. Official side, written here from google-research/simclr:
the loss of `objective.py add_contrastive_loss` (both directions' softmax cross-entropies with the
self-similarity pushed down by LARGE_NUM, each a mean over the N images, summed) through the same
model, and the update of `lars_optimizer.py` (classic momentum) in NumPy. Both run in float64, so
they agree to rounding: a loss at half the official scale would move the batch-norm and bias leaves
(no trust ratio) by half, and a trust ratio or weight decay off by anything would move the kernels.
(The previous recipe, the paper's per-anchor mean with half the official weight decay, gives the
kernels the same first update, to 4e-14, and every batch-norm parameter exactly half of it.)

The online probe (`linear_head`) is left out: the official TF1 pretraining has none, and our
trainer steps it with an optimizer of its own (`optim.with_probe_optimizer`).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from simclr_jax import models
from simclr_jax import optim
from simclr_jax.jobs import pretrain

# ResNet-18 at width 1/8 with the CIFAR stem and the v1 projection head, on 16 px views.
MODEL_CONFIG = dict(depth=18, width_multiplier=0.125, cifar_stem=True, head_layers=2)
NUM_IMAGES, IMAGE_SIZE, NUM_CLASSES = 6, 16, 10
TEMPERATURE = 0.5
# The official CIFAR-10 command's peak rate (1.0 * 512 / 256) and v2 weight decay; run.py's
# momentum; lars_optimizer.py's EETA_DEFAULT.
LEARNING_RATE, WEIGHT_DECAY, MOMENTUM, EETA = 2.0, 1e-4, 0.9, 0.001
LARGE_NUM = 1e9  # objective.py
PROBE = "linear_head"
# A kernel zeroed before the first step, so the trust ratio's |w| = 0 branch is taken.
ZEROED_KERNEL = ("encoder", "block2_0", "shortcut_conv", "kernel")


def official_contrastive_loss(z, temperature):
  """objective.py add_contrastive_loss on one replica (hidden_norm=True), in float64."""
  hidden = z / jnp.sqrt(jnp.maximum(jnp.sum(z * z, axis=1, keepdims=True), 1e-12))
  hidden1, hidden2 = jnp.split(hidden, 2)
  batch_size = hidden1.shape[0]
  labels = jax.nn.one_hot(jnp.arange(batch_size), batch_size * 2, dtype=z.dtype)
  masks = jax.nn.one_hot(jnp.arange(batch_size), batch_size, dtype=z.dtype)
  logits_aa = hidden1 @ hidden1.T / temperature - masks * LARGE_NUM
  logits_bb = hidden2 @ hidden2.T / temperature - masks * LARGE_NUM
  logits_ab = hidden1 @ hidden2.T / temperature
  logits_ba = hidden2 @ hidden1.T / temperature

  def softmax_cross_entropy(logits):  # tf.losses' default reduction: the mean over the rows
    return jnp.mean(-jnp.sum(labels * jax.nn.log_softmax(logits, axis=1), axis=1))

  return (softmax_cross_entropy(jnp.concatenate([logits_ab, logits_aa], 1)) +
          softmax_cross_entropy(jnp.concatenate([logits_ba, logits_bb], 1)))


def official_lars_step(params, grads, momenta, excluded):
  """lars_optimizer.py apply_gradients (classic_momentum=True, no Nesterov) on dicts of arrays.

  `excluded[name]`: the official `exclude_from_weight_decay=['batch_normalization', 'bias']`
  match, which also excludes from layer adaptation (exclude_from_layer_adaptation=None).
  """
  new_params, new_momenta = {}, {}
  for name, param in params.items():
    grad = grads[name]
    if not excluded[name]:
      grad = grad + WEIGHT_DECAY * param
    trust_ratio = 1.0
    if not excluded[name]:
      w_norm, g_norm = np.linalg.norm(param), np.linalg.norm(grad)
      trust_ratio = (EETA * w_norm / g_norm) if w_norm > 0 and g_norm > 0 else 1.0
    scaled_lr = LEARNING_RATE * trust_ratio
    new_momenta[name] = MOMENTUM * momenta[name] + scaled_lr * grad
    new_params[name] = param - new_momenta[name]
  return new_params, new_momenta


def flat(tree):
  """{'a/b/c': float64 array} of a params tree, without the probe."""
  return {"/".join(key.key for key in path): np.asarray(leaf, np.float64)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if path[0].key != PROBE}


def unflatten_like(tree, flat_leaves):
  """`tree` with its non-probe leaves replaced by `flat_leaves` (names as `flat` makes them)."""
  def replace(path, leaf):
    if path[0].key == PROBE:
      return leaf
    return jnp.asarray(flat_leaves["/".join(key.key for key in path)])
  return jax.tree_util.tree_map_with_path(replace, tree)


def starting_point(model):
  """float64 params with every BN scale/offset moved off its init (the zero-init last-BN scales
  would otherwise stop all gradient in the residual branches) and one kernel zeroed."""
  variables = model.init(jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)),
                         train=False)
  rng = np.random.default_rng(0)

  def start(path, leaf):
    leaf = np.asarray(leaf, np.float64)
    if tuple(key.key for key in path) == ZEROED_KERNEL:
      return jnp.zeros_like(leaf)
    if leaf.ndim == 1:
      leaf = leaf + 0.3 * rng.normal(size=leaf.shape)
    return jnp.asarray(leaf)

  return (jax.tree_util.tree_map_with_path(start, variables["params"]),
          jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables["batch_stats"]))


def test_two_lars_steps_on_a_resnet_equal_the_official_update():
  rng = np.random.default_rng(1)
  batches = [(rng.random((2 * NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3)),
              rng.integers(0, NUM_CLASSES, NUM_IMAGES)) for _ in range(2)]
  with jax.enable_x64(True):
    model = models.create_model(MODEL_CONFIG, num_classes=NUM_CLASSES, dtype=jnp.float64)
    params, batch_stats = starting_point(model)
    loss_fn = pretrain.make_loss_fn(model, temperature=TEMPERATURE, axis_name=None)
    optimizer = optim.create_optimizer("lars", LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                                       momentum=MOMENTUM, trust_coefficient=EETA)

    @jax.jit
    def our_step(params, opt_state, views, labels):
      grads, _ = jax.grad(loss_fn, has_aux=True)(params, batch_stats, views, labels)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def official_gradients(params, views):
      def loss(params):
        outputs, _ = model.apply({"params": params, "batch_stats": batch_stats}, views,
                                 train=True, mutable=["batch_stats"])
        return official_contrastive_loss(outputs["z"], TEMPERATURE)
      return jax.grad(loss)(params)

    ours, opt_state = params, optimizer.init(params)
    official = flat(params)
    momenta = {name: np.zeros_like(leaf) for name, leaf in official.items()}
    # Batch-norm scales and offsets are the 1-D leaves (the head's dense layers have no bias):
    # found by shape here, by name in optim.decay_mask.
    excluded = {name: leaf.ndim == 1 for name, leaf in official.items()}
    assert sum(excluded.values()) == 43 and len(excluded) == 65  # 21 BN layers, 22 kernels
    moved = set()
    for step, (views, labels) in enumerate(batches):
      ours_before, official_before = flat(ours), official
      ours, opt_state = our_step(ours, opt_state, jnp.asarray(views), jnp.asarray(labels))
      grads = flat(official_gradients(unflatten_like(params, official), jnp.asarray(views)))
      official, momenta = official_lars_step(official, grads, momenta, excluded)
      for name, leaf in flat(ours).items():
        official_update = official_before[name] - official[name]
        if np.any(official_update != 0):
          moved.add(name)
        np.testing.assert_allclose(ours_before[name] - leaf, official_update, rtol=1e-6,
                                   atol=1e-9 * np.abs(official_update).max(),
                                   err_msg=f"step {step}, {name}")
    assert moved == set(official)  # every leaf, excluded or not, took part
