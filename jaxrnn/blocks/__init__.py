"""How each layer wraps its cell (`model.block`): the plain stack, a pre-norm residual block,
and the blocks of Hawk and Griffin, xLSTM and Mamba as their authors wrote them, one module per
family (named for its paper) and one for the pieces they share (`common`).

  stack      stacked cells, dropout between layers (`layers.run_stack`)
  residual   x + cell(norm(x)), then x + mlp(norm(x)); any cell (`residual`)
  hawk       recurrentgemma's residual blocks of RG-LRU (cell rglru) and gated MLP (`griffin`)
  griffin    Hawk's blocks with local multi-query attention at every third layer (`griffin`)
  xlstm      xLSTM's mLSTM blocks (cell mlstm), sLSTM blocks at model.slstm_at (`xlstm`)
  mamba      Mamba-1's block (cell mamba) (`mamba`)

Every block but the stack runs a residual stream of model.hidden_size (h) units: the
embedding is projected into it (`w_in`) where model.embed_dim differs, and a final norm
(`norm`) ends it. A block's carry holds all the next step needs (each convolution's last
width - 1 inputs, the attention's window), so one token at a time equals the whole sequence.
Where the authors' code fixes a size or an initialisation, it is theirs (cited per module);
tests/test_authors.py compares each with the authors' own packages.

Shapes: x<float>[b, t, h] batch-major.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxrnn import cells, layers
from jaxrnn.blocks import griffin, mamba, residual, xlstm
from jaxrnn.blocks.common import Block, Config, Step, uniform
from jaxrnn.cells import Carry, Cell, matmul

BLOCKS = ("stack", "residual", "hawk", "griffin", "xlstm", "mamba")
_BLOCKS: dict[str, Block] = {"residual": residual.RESIDUAL, "hawk": griffin.GRIFFIN,
                             "griffin": griffin.GRIFFIN, "xlstm": xlstm.XLSTM,
                             "mamba": mamba.MAMBA}
# The cell an authors' block is built around; "stack" and "residual" run any cell.
CELLS = {"hawk": "rglru", "griffin": "rglru", "xlstm": "mlstm", "mamba": "mamba"}
# Cell options a block reads besides the cell itself.
OPTIONS = {"hawk": griffin.OPTIONS, "griffin": griffin.OPTIONS}


def takes(model_config: Config) -> set[str]:
  """The cell options a run reads: its cell's and its block's (`OPTIONS`)."""
  return cells.takes(model_config.cell) | set(OPTIONS.get(model_config.block, ()))


def cell(model_config: Config) -> Cell:
  """The cell the layers run (`cells.from_config`), its options checked with the block's."""
  return cells.from_config(model_config, also=OPTIONS.get(model_config.block, ()))


def init(keys: list[jax.Array], model_config: Config, input_size: int, sizes: list[int],
         directions: int) -> dict[str, Any]:
  """{"layers": one params dict per layer (key keys[i])} and, for a residual stream,
  "norm"<h> (the final norm) and "w_in"<d, h> where the input is not h wide.

  The stack's layer i maps sizes[i - 1] (input_size for the first) to sizes[i], as a
  {'fwd', 'bwd'} pair for two directions.
  """
  if model_config.block == "stack":
    c = cell(model_config)

    def layer(k, d, h):
      if directions == 1:
        return c.init(k, d, h)
      k_f, k_b = jax.random.split(k)
      return {"fwd": c.init(k_f, d, h), "bwd": c.init(k_b, d, h)}

    return {"layers": [layer(k, input_size if i == 0 else directions * sizes[i - 1], sizes[i])
                       for i, k in enumerate(keys)]}
  block, h = _BLOCKS[model_config.block], model_config.hidden_size
  params = {"layers": [block.init(k, model_config, i) for i, k in enumerate(keys)],
            "norm": jnp.zeros((h,))}
  if input_size != h:
    params["w_in"] = uniform(jax.random.fold_in(keys[0], 7), (input_size, h),
                              1.0 / math.sqrt(input_size))
  return params


def initial_carry(model_config: Config, batch_size: int, sizes: list[int]) -> list[Carry]:
  """Zero carries, one per layer (the stack's layer i of width sizes[i]), for b = batch_size."""
  if model_config.block == "stack":
    c = cell(model_config)
    return [c.initial_carry(batch_size, h) for h in sizes]
  block = _BLOCKS[model_config.block]
  return [block.initial_carry(model_config, batch_size, i) for i in range(len(sizes))]


def run(params: dict[str, Any], carries: list[Carry], x: jax.Array, *, model_config: Config,
        dropout_rate: float = 0.0, rng: jax.Array | None = None,
        weight_rng: jax.Array | None = None, bidirectional: bool = False,
        lengths: jax.Array | None = None) -> tuple[list[Carry], jax.Array]:
  """The layers over x<float>[b, t, d] -> (carries, y<float>[b, t, h]).

  With `rng` (keys<key>[b]): dropout at `dropout_rate` (locked if model.locked_dropout)
  between the stack's layers, or on each branch of a residual block before it is added;
  with `weight_rng`: weight drop on each layer's recurrent matrix. `bidirectional` and
  `lengths` as in `layers.run_stack` (the stack only).
  """
  rate = dropout_rate
  if model_config.block == "stack":
    return layers.run_stack(cell(model_config), params["layers"], carries, x, dropout_rate=rate,
                            rng=rng, unroll=model_config.unroll, impl=model_config.impl,
                            bidirectional=bidirectional, lengths=lengths,
                            locked=model_config.locked_dropout,
                            weight_drop=model_config.weight_drop, weight_rng=weight_rng)
  block, n = _BLOCKS[model_config.block], len(params["layers"])
  keys = layers.split_rows(rng, 2 * n, x.shape[0]) if rng is not None else None
  if "w_in" in params:
    x = matmul(x, params["w_in"], cell(model_config).dtype)
  new_carries = []
  for i, (layer_params, carry) in enumerate(zip(params["layers"], carries)):
    w_key = None if weight_rng is None else jax.random.fold_in(weight_rng, i)
    step = Step(model_config.impl, model_config.unroll,
                drop=lambda y, j, i=i: y if keys is None else layers.dropout(
                    y, rate, keys[2 * i + j], model_config.locked_dropout),
                weight_drop=lambda c, p, w_key=w_key: layers.drop_weight(
                    c, p, model_config.weight_drop, w_key))
    carry, x = block.apply(layer_params, carry, x, model_config, i, step)
    new_carries.append(carry)
  return new_carries, block.norm(x, params["norm"])
