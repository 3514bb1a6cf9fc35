"""mamba: Mamba-1's block (Gu and Dao 2023) as in state-spaces/mamba,
mamba_ssm/modules/mamba_simple.py `Mamba` inside modules/block.py `Block` (pre-norm):
x + out(ssm(silu(conv(u))) * silu(z)), (u, z) = W_in rms(x), cell mamba (the selective scan)."""

import functools
import math

import jax
import jax.numpy as jnp

from jaxrnn import cells, layers
from jaxrnn.blocks.common import Block, Config, causal_conv, conv_init, dense, rms_norm, uniform
from jaxrnn.cells import Cell

EPS = 1e-5  # the authors' RMSNorm epsilon


def _cell(model_config: Config) -> Cell:
  """The selective scan with the authors' dt_rank "auto" of the model width, ceil(h / 16)."""
  return cells.get("mamba", state_size=model_config.state_size,
                   dt_rank=model_config.dt_rank or math.ceil(model_config.hidden_size / 16),
                   compute_dtype=model_config.compute_dtype)


def _init(key, model_config, layer):
  """The authors' init: projections as torch.nn.Linear (U(+-1/sqrt(fan_in)), no biases), the
  output one divided by sqrt(num_layers) (MixerModel's _init_weights), the conv as Conv1d's."""
  del layer
  h = model_config.hidden_size
  inner = model_config.expand * h
  k_in, k_conv, k_cell, k_out = jax.random.split(key, 4)
  return {"norm": jnp.zeros((h,)),
          "in_proj": {"w": uniform(k_in, (h, 2 * inner), 1.0 / math.sqrt(h))},
          "conv": conv_init(k_conv, model_config.conv_width, inner),
          "cell": _cell(model_config).init(k_cell, inner, inner),
          "out_proj": {"w": uniform(k_out, (inner, h), 1.0 / math.sqrt(inner))
                       / math.sqrt(model_config.num_layers)}}


def _carry(model_config, b, layer):
  del layer
  inner = model_config.expand * model_config.hidden_size
  return (jnp.zeros((b, model_config.conv_width - 1, inner)),
          _cell(model_config).initial_carry(b, inner))


def _apply(params, carry, x, model_config, layer, step):
  del layer
  c = _cell(model_config)
  conv_state, ssm_state = carry
  u, z = jnp.split(dense(params["in_proj"], rms_norm(x, params["norm"], EPS), c.dtype), 2,
                   axis=-1)
  u, conv_state = causal_conv(params["conv"], u, conv_state)
  ssm_state, y = layers.run(c, params["cell"], ssm_state, jax.nn.silu(u), unroll=step.unroll,
                            impl=step.impl)  # y includes the D skip
  y = dense(params["out_proj"], y * jax.nn.silu(z), c.dtype)
  return (conv_state, ssm_state), x + step.drop(y, 0)


MAMBA = Block(_init, _carry, _apply, functools.partial(rms_norm, eps=EPS))
