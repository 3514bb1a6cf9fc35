"""residual: the pre-norm block of current language models around any cell of the registry,
x + cell(rms(x)), then x + mlp(rms(x)), with recurrentgemma's RMSNorm and gated MLP (width
model.mlp_expansion * h)."""

import functools
import math

import jax
import jax.numpy as jnp

from jaxrnn import cells, layers
from jaxrnn.blocks.common import RG_EPS, Block, gated_mlp, mlp_init, rms_norm


def _init(key, model_config, layer):
  del layer
  h, k_cell, k_mlp = model_config.hidden_size, *jax.random.split(key)
  m = model_config.mlp_expansion * h
  return {"norm": jnp.zeros((h,)), "cell": cells.from_config(model_config).init(k_cell, h, h),
          "mlp_norm": jnp.zeros((h,)),
          "mlp": mlp_init(k_mlp, h, m, math.sqrt(2.0 / model_config.num_layers / m))}


def _carry(model_config, b, layer):
  del layer
  return cells.from_config(model_config).initial_carry(b, model_config.hidden_size)


def _apply(params, carry, x, model_config, layer, step):
  del layer
  c = cells.from_config(model_config)
  carry, y = layers.run(c, step.weight_drop(c, params["cell"]), carry,
                        rms_norm(x, params["norm"], RG_EPS), unroll=step.unroll, impl=step.impl)
  x = x + step.drop(y, 0)
  y = gated_mlp(params["mlp"], rms_norm(x, params["mlp_norm"], RG_EPS), c.dtype, approximate=True)
  return carry, x + step.drop(y, 1)


RESIDUAL = Block(_init, _carry, _apply, functools.partial(rms_norm, eps=RG_EPS))
