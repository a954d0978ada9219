"""The training state: everything a step changes and a checkpoint must hold."""

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: number of updates applied
  params: Any            # float32 master parameters
  opt_state: Any
  ema_params: Any
  rng: jax.Array         # base key; step k uses fold_in(rng, k)


def init_inputs(data_config, batch: int = 1):
  """Dummy (x, model_time, condition) to trace a denoiser's parameters: int labels, or
  a text condition dict for a text-to-image run (data.tokenizer set)."""
  import jax.numpy as jnp
  from ldm_jax.data.text import condition_struct, is_text
  size, channels = data_config.image_size, data_config.channels
  cond = jnp.zeros((batch,), jnp.int32)
  if is_text(data_config):
    cond = {k: jnp.zeros(shape, dtype) for k, (shape, dtype)
            in condition_struct(data_config, batch).items()}
  return (jnp.zeros((batch, size, size, channels), jnp.float32), jnp.zeros((batch,), jnp.float32),
          cond)


def create_state(model, tx, data_config, seed: int, mesh, rules, materialize: bool = True,
                 inputs=None):
  """A TrainState born sharded: eval_shape -> logical shardings -> jit(init).

  `inputs`: the dummy arguments `model.init` is called with (default: a denoiser's,
  `init_inputs(data_config)`).
  Returns (state, shardings); with materialize=False the state is abstract
  (ShapeDtypeStructs carrying their shardings), e.g. as a restore target.
  """
  import flax.linen as nn
  from ldm_jax.training.sharding import replicated, shardings_from_boxed
  if inputs is None:
    inputs = init_inputs(data_config)

  def init(key):
    init_key, state_key = jax.random.split(key)
    boxed = model.init({"params": init_key}, *inputs)["params"]
    params = nn.unbox(boxed)
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                      opt_state=tx.init(params), ema_params=params, rng=state_key)

  key = jax.random.key(seed)
  boxed_shapes = jax.eval_shape(
      lambda k: model.init({"params": k}, *inputs)["params"], key)
  param_shardings = shardings_from_boxed(boxed_shapes, mesh, rules)
  abstract = jax.eval_shape(init, key)
  # Optimizer-state leaves shaped like params follow the params; the rest replicate.
  opt_shardings = optax_state_shardings(abstract.opt_state, abstract.params, param_shardings,
                                        replicated(mesh))
  shardings = TrainState(step=replicated(mesh), params=param_shardings, opt_state=opt_shardings,
                         ema_params=param_shardings, rng=replicated(mesh))
  if not materialize:
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings), shardings
  return jax.jit(init, out_shardings=shardings)(key), shardings


def optax_state_shardings(opt_state, params, param_shardings, default):
  """Sharding for each optimizer-state leaf: a sub-tree with the structure of the
  params (Adam's mu / nu) takes the params' shardings; anything else `default`."""
  param_struct = jax.tree_util.tree_structure(params)

  def assign(node):
    if jax.tree_util.tree_structure(node) == param_struct:
      return param_shardings
    return None

  def walk(node):
    match = assign(node)
    if match is not None:
      return match
    if isinstance(node, jax.ShapeDtypeStruct) or not jax.tree_util.tree_leaves(node):
      return jax.tree_util.tree_map(lambda _: default, node)
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    return jax.tree_util.tree_unflatten(treedef, [walk(c) for c in children])

  return walk(opt_state)
