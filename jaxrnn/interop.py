"""Weights between jaxrnn cells and `torch.nn.RNN/GRU/LSTM` state dicts (NumPy in and out).

PyTorch stores W_ih<g, d>, W_hh<g, h> and two biases; jaxrnn stores the transposes and the
sum of the biases, except the GRU's b_hn (see `cells`). This module never imports torch:
tensors are read through `.detach().cpu().numpy()` when they have it.
"""

from typing import Any, Mapping

import numpy as np

from jaxrnn import UserError, cells

_TORCH_CELLS = ("rnn", "gru", "lstm")


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):
    value = value.detach().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


def _check(cell_name: str) -> None:
  cells.get(cell_name)
  if cell_name not in _TORCH_CELLS:
    raise UserError(f"no PyTorch counterpart for cell {cell_name!r}; interop knows {', '.join(_TORCH_CELLS)}")


def from_torch_state_dict(cell_name: str, state_dict: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
  """One jaxrnn params dict per layer from a torch.nn.RNN/GRU/LSTM state dict."""
  _check(cell_name)
  if any(k.endswith("_reverse") for k in state_dict):
    raise UserError("bidirectional PyTorch modules are not supported by interop")
  num_layers = sum(1 for k in state_dict if k.startswith("weight_ih_l"))
  if num_layers == 0:
    raise UserError(f"no 'weight_ih_l0' in the state dict; keys: {sorted(state_dict)}")
  layers = []
  for k in range(num_layers):
    w_ih, w_hh = _numpy(state_dict[f"weight_ih_l{k}"]), _numpy(state_dict[f"weight_hh_l{k}"])
    h = w_hh.shape[1]
    zeros = np.zeros(w_ih.shape[0], np.float32)
    b_ih = _numpy(state_dict.get(f"bias_ih_l{k}", zeros))
    b_hh = _numpy(state_dict.get(f"bias_hh_l{k}", zeros))
    params = {"w_ih": w_ih.T.copy(), "w_hh": w_hh.T.copy()}
    if cell_name == "gru":  # b_hn stays inside r * (W_hn h + b_hn)
      params["b"] = b_ih + np.concatenate([b_hh[:2 * h], np.zeros(h, np.float32)])
      params["b_hn"] = b_hh[2 * h:].copy()
    else:
      params["b"] = b_ih + b_hh
    layers.append(params)
  return layers


def to_torch_state_dict(cell_name: str, layer_params: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """A torch.nn.RNN/GRU/LSTM state dict (NumPy arrays) from jaxrnn per-layer params."""
  _check(cell_name)
  state = {}
  for k, params in enumerate(layer_params):
    w_ih, w_hh, b = _numpy(params["w_ih"]), _numpy(params["w_hh"]), _numpy(params["b"])
    h = w_hh.shape[0]
    state[f"weight_ih_l{k}"] = w_ih.T.copy()
    state[f"weight_hh_l{k}"] = w_hh.T.copy()
    state[f"bias_ih_l{k}"] = b.copy()
    b_hh = np.zeros_like(b)
    if cell_name == "gru":
      b_hh[2 * h:] = _numpy(params["b_hn"])
    state[f"bias_hh_l{k}"] = b_hh
  return state
