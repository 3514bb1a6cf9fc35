"""Parity of jaxrnn cells with torch.nn.RNN/GRU/LSTM (values and gradients) and flax.linen cells."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxrnn import cells, interop, layers

B, T, D, H = 3, 7, 4, 5
RTOL, ATOL = 1e-5, 1e-6

# (cell name, torch nonlinearity or None)
VARIANTS = [("rnn", "tanh"), ("rnn", "relu"), ("gru", None), ("lstm", None)]
VARIANT_IDS = ["rnn_tanh", "rnn_relu", "gru", "lstm"]


def _torch_module(name, nonlinearity, num_layers, seed=0):
  torch.manual_seed(seed)
  if name == "rnn":
    return torch.nn.RNN(D, H, num_layers, nonlinearity=nonlinearity, batch_first=True)
  module_class = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[name]
  return module_class(D, H, num_layers, batch_first=True)


def _jax_cell(name, nonlinearity):
  return cells.get(name, nonlinearity=nonlinearity) if name == "rnn" else cells.get(name)


def _inputs(name, num_layers, seed=0):
  """Random xs<b, t, d>, cotangent<b, t, h> and nonzero initial states in torch's layout."""
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(B, T, D)).astype(np.float32)
  cotangent = rng.normal(size=(B, T, H)).astype(np.float32)
  states = [rng.normal(size=(num_layers, B, H)).astype(np.float32)
            for _ in range(2 if name == "lstm" else 1)]
  return xs, cotangent, states


def _torch_forward(module, name, xs, states):
  """(ys, final states as a list of (layers, b, h) tensors) from the torch module."""
  torch_states = [s if isinstance(s, torch.Tensor) else torch.from_numpy(s) for s in states]
  h0 = tuple(torch_states) if name == "lstm" else torch_states[0]
  ys, final = module(xs, h0)
  return ys, list(final) if name == "lstm" else [final]


def _jax_carries(name, states):
  num_layers = states[0].shape[0]
  if name == "lstm":
    return [(jnp.asarray(states[0][k]), jnp.asarray(states[1][k])) for k in range(num_layers)]
  return [jnp.asarray(states[0][k]) for k in range(num_layers)]


def _jax_forward(cell, layer_params, carries, xs):
  """layers.run for one layer, layers.run_stack for more; final states in torch's layout."""
  if len(layer_params) == 1:
    carry, ys = layers.run(cell, layer_params[0], carries[0], xs)
    final = [carry]
  else:
    final, ys = layers.run_stack(cell, layer_params, carries, xs)
  if cell.name == "lstm":
    return ys, [jnp.stack([c[0] for c in final]), jnp.stack([c[1] for c in final])]
  return ys, [jnp.stack(final)]


def _to_jax(layer_params):
  return [{k: jnp.asarray(v) for k, v in params.items()} for params in layer_params]


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("name, nonlinearity", VARIANTS, ids=VARIANT_IDS)
def test_forward_matches_torch(name, nonlinearity, num_layers):
  """Outputs and final states equal torch's for weights moved with from_torch_state_dict."""
  module = _torch_module(name, nonlinearity, num_layers)
  xs, _, states = _inputs(name, num_layers)
  with torch.no_grad():
    torch_ys, torch_final = _torch_forward(module, name, torch.from_numpy(xs), states)

  layer_params = _to_jax(interop.from_torch_state_dict(name, module.state_dict()))
  assert len(layer_params) == num_layers
  ys, final = _jax_forward(_jax_cell(name, nonlinearity), layer_params,
                           _jax_carries(name, states), jnp.asarray(xs))
  np.testing.assert_allclose(ys, torch_ys.numpy(), rtol=RTOL, atol=ATOL)
  assert len(final) == len(torch_final)
  for got, expected in zip(final, torch_final):
    np.testing.assert_allclose(got, expected.numpy(), rtol=RTOL, atol=ATOL)


def _jax_bias_grad_expected(name, bias_ih_grad, bias_hh_grad):
  """torch's bias gradients mapped onto jaxrnn's (b, b_hn)."""
  if name != "gru":
    np.testing.assert_allclose(bias_ih_grad, bias_hh_grad, rtol=RTOL, atol=ATOL)
    return {"b": bias_ih_grad}
  return {"b": np.concatenate([bias_hh_grad[:2 * H], bias_ih_grad[2 * H:]]),
          "b_hn": bias_hh_grad[2 * H:]}


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("name, nonlinearity", VARIANTS, ids=VARIANT_IDS)
def test_gradients_match_torch(name, nonlinearity, num_layers):
  """Gradients of sum(ys * cotangent) w.r.t. inputs, initial states and weights equal torch's."""
  module = _torch_module(name, nonlinearity, num_layers, seed=1)
  xs, cotangent, states = _inputs(name, num_layers, seed=1)
  torch_xs = torch.from_numpy(xs).requires_grad_(True)
  torch_states = [torch.from_numpy(s).requires_grad_(True) for s in states]
  torch_ys, _ = _torch_forward(module, name, torch_xs, torch_states)
  (torch_ys * torch.from_numpy(cotangent)).sum().backward()

  cell = _jax_cell(name, nonlinearity)
  layer_params = _to_jax(interop.from_torch_state_dict(name, module.state_dict()))

  def loss(layer_params, xs, states):
    ys, _ = _jax_forward(cell, layer_params, _jax_carries(name, states), xs)
    return jnp.sum(ys * jnp.asarray(cotangent))

  params_grad, xs_grad, states_grad = jax.grad(loss, argnums=(0, 1, 2))(
      layer_params, jnp.asarray(xs), [jnp.asarray(s) for s in states])
  np.testing.assert_allclose(xs_grad, torch_xs.grad.numpy(), rtol=RTOL, atol=ATOL)
  for got, expected in zip(states_grad, torch_states, strict=True):
    np.testing.assert_allclose(got, expected.grad.numpy(), rtol=RTOL, atol=ATOL)
  for k, grads in enumerate(params_grad):
    torch_grad = {key: getattr(module, f"{key}_l{k}").grad.numpy()
                  for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    expected = {"w_ih": torch_grad["weight_ih"].T, "w_hh": torch_grad["weight_hh"].T,
                **_jax_bias_grad_expected(name, torch_grad["bias_ih"], torch_grad["bias_hh"])}
    assert set(grads) == set(expected)
    for key in expected:
      np.testing.assert_allclose(grads[key], expected[key], rtol=RTOL, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("name, nonlinearity", VARIANTS, ids=VARIANT_IDS)
def test_state_dict_round_trip(name, nonlinearity, num_layers):
  """to_torch_state_dict(from_torch_state_dict(sd)) loads strictly into a fresh module and agrees."""
  module = _torch_module(name, nonlinearity, num_layers, seed=2)
  state_dict = interop.to_torch_state_dict(
      name, interop.from_torch_state_dict(name, module.state_dict()))
  assert set(state_dict) == set(module.state_dict())
  fresh = _torch_module(name, nonlinearity, num_layers, seed=3)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})

  xs, _, states = _inputs(name, num_layers, seed=2)
  with torch.no_grad():
    expected_ys, expected_final = _torch_forward(module, name, torch.from_numpy(xs), states)
    got_ys, got_final = _torch_forward(fresh, name, torch.from_numpy(xs), states)
  np.testing.assert_allclose(got_ys.numpy(), expected_ys.numpy(), rtol=RTOL, atol=ATOL)
  for got, expected in zip(got_final, expected_final):
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=RTOL, atol=ATOL)


def _flax_inputs(seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  h = jnp.asarray(rng.normal(size=(B, H)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(B, H)), jnp.float32)
  return x, h, c


def test_gru_matches_flax():
  """A flax.linen.GRUCell step equals jaxrnn's gru step with its weights mapped by hand."""
  flax_cell = nn.GRUCell(features=H, bias_init=nn.initializers.normal(0.5))
  x, h, _ = _flax_inputs(0)
  p = flax_cell.init(jax.random.key(0), h, x)["params"]
  params = {
      "w_ih": jnp.concatenate([p["ir"]["kernel"], p["iz"]["kernel"], p["in"]["kernel"]], axis=1),
      "w_hh": jnp.concatenate([p["hr"]["kernel"], p["hz"]["kernel"], p["hn"]["kernel"]], axis=1),
      "b": jnp.concatenate([p["ir"]["bias"], p["iz"]["bias"], p["in"]["bias"]]),
      "b_hn": p["hn"]["bias"],
  }
  expected_carry, expected_y = flax_cell.apply({"params": p}, h, x)
  carry, y = cells.get("gru").step(params, h, x)
  np.testing.assert_allclose(y, expected_y, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(carry, expected_carry, rtol=RTOL, atol=ATOL)


def test_lstm_matches_flax():
  """A flax.linen.LSTMCell step (carry (c, h)) equals jaxrnn's lstm step (carry (h, c))."""
  flax_cell = nn.LSTMCell(features=H, bias_init=nn.initializers.normal(0.5))
  x, h, c = _flax_inputs(1)
  p = flax_cell.init(jax.random.key(1), (c, h), x)["params"]
  gates = ["i", "f", "g", "o"]
  params = {
      "w_ih": jnp.concatenate([p[f"i{g}"]["kernel"] for g in gates], axis=1),
      "w_hh": jnp.concatenate([p[f"h{g}"]["kernel"] for g in gates], axis=1),
      "b": jnp.concatenate([p[f"h{g}"]["bias"] for g in gates]),
  }
  (expected_c, expected_h), expected_y = flax_cell.apply({"params": p}, (c, h), x)
  (got_h, got_c), y = cells.get("lstm").step(params, (h, c), x)
  np.testing.assert_allclose(y, expected_y, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got_h, expected_h, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got_c, expected_c, rtol=RTOL, atol=ATOL)
