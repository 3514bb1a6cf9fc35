"""tests/authors.py gives working modules of the authors' own code: recurrentgemma (JAX/Flax),
xlstm and mamba-ssm (PyTorch), installed beside jaxrnn's pins, run in float64 on the CPU."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import authors

# The loaders are exercised in the default suite by test_griffin.py, test_xlstm.py and
# test_mamba.py; these direct checks of the harness itself run with the slow tests.
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_torch_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["RECURRENT", "ATTENTION"])
def test_recurrentgemma_residual_block_float64(kind):
  """Their ResidualBlock inits and applies in float64 (their typecheck decorators accept it), then
  decodes one more token from the cache it returned."""
  rg = authors.recurrentgemma()
  assert rg.version == "1.0.1"
  with jax.enable_x64(True):
    block = rg.modules.ResidualBlock(
        width=16, mlp_expanded_width=32, num_heads=4, attention_window_size=8,
        temporal_block_type=rg.common.TemporalBlockType[kind], dtype=jnp.float64,
        param_dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 16)))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    params = jax.jit(block.init)(jax.random.key(0), x, pos)
    assert all(p.dtype == jnp.float64 for p in jax.tree.leaves(params))
    y, cache = jax.jit(block.apply)(params, x, pos)
    y_next, _ = jax.jit(block.apply)(params, x[:, :1], pos[:, :1] + 6, cache)
  for out in (y, y_next):
    assert out.dtype == jnp.float64 and np.all(np.isfinite(np.asarray(out)))
  assert y.shape == (2, 6, 16) and y_next.shape == (2, 1, 16)


def test_xlstm_layers_float64():
  """Their sLSTM (vanilla backend) and mLSTM layers, and a two-block stack, run in float64; the
  sLSTM layer's forward equals its step loop to float64 precision (float32 would show ~1e-7)."""
  xl = authors.xlstm()
  assert xl.version == "2.0.6"
  assert callable(xl.mlstm_backends.parallel_stabilized_simple)
  assert callable(xl.mlstm_backends.recurrent_step_stabilized_simple)
  torch.manual_seed(0)
  x = torch.randn(2, 8, 16, dtype=torch.float64)
  slstm = xl.sLSTMLayer(xl.sLSTMLayerConfig(embedding_dim=16, num_heads=4, backend="vanilla"))
  mlstm = xl.mLSTMLayer(xl.mLSTMLayerConfig(embedding_dim=16, num_heads=4, context_length=8))
  stack = xl.xLSTMBlockStack(xl.xLSTMBlockStackConfig(
      mlstm_block=xl.mLSTMBlockConfig(mlstm=xl.mLSTMLayerConfig(num_heads=4)),
      slstm_block=xl.sLSTMBlockConfig(slstm=xl.sLSTMLayerConfig(num_heads=4, backend="vanilla"),
                                      feedforward=xl.FeedForwardConfig()),
      num_blocks=2, embedding_dim=16, context_length=8, slstm_at=[1]))
  with torch.no_grad():
    for module in (slstm, mlstm, stack):
      module.double()
      for p in module.parameters():  # off their zero / constant inits, so every path counts
        p.add_(0.1 * torch.randn_like(p))
    outputs = {}
    for name, module, step in (("slstm", slstm, lambda x_t, s: slstm.step(x_t, **s)),
                               ("mlstm", mlstm, lambda x_t, s: mlstm.step(x_t, **s)),
                               ("stack", stack, lambda x_t, s: stack.step(x_t, s))):
      outputs[name] = module(x)
      steps, state = [], {}
      for t in range(8):
        y_t, state = step(x[:, t:t + 1], state)
        steps.append(y_t)
      outputs[name + " steps"] = torch.cat(steps, 1)
  for name, y in outputs.items():
    assert y.dtype == torch.float64 and y.shape == (2, 8, 16), name
    assert torch.isfinite(y).all() and y.abs().max() > 1e-3, name
  torch.testing.assert_close(outputs["slstm steps"], outputs["slstm"], rtol=0, atol=1e-13)
  # mLSTM: the parallel and the recurrent backends place their eps differently (~1e-7 apart)
  torch.testing.assert_close(outputs["mlstm steps"], outputs["mlstm"], rtol=0, atol=1e-5)
  torch.testing.assert_close(outputs["stack steps"], outputs["stack"], rtol=0, atol=1e-5)


def _selective_scan_numpy(u, delta, A, B, C, D, z, delta_bias=None, delta_softplus=False):
  """The selective scan written out in float64 NumPy, one channel, state entry and step at a time
  (the authors' channel-major layout: u, delta, z [b, d, t]; B, C [b, n, t]; A [d, n])."""
  batch, dim, length = u.shape
  if delta_bias is not None:
    delta = delta + delta_bias[None, :, None]
  if delta_softplus:
    delta = np.log1p(np.exp(delta))
  y = np.zeros_like(u)
  state = np.zeros((batch, dim, A.shape[1]))
  for b in range(batch):
    for d in range(dim):
      for t in range(length):
        acc = 0.0
        for n in range(A.shape[1]):
          state[b, d, n] = (np.exp(delta[b, d, t] * A[d, n]) * state[b, d, n]
                            + delta[b, d, t] * B[b, n, t] * u[b, d, t])
          acc += state[b, d, n] * C[b, n, t]
        out = acc + D[d] * u[b, d, t]
        y[b, d, t] = out * z[b, d, t] / (1.0 + np.exp(-z[b, d, t]))  # * silu(z)
  return y, state


def test_mamba_selective_scan_ref_against_a_numpy_loop():
  """Their selective_scan_ref against the recurrence written out in float64 NumPy
  (deltaA = exp(delta*A), state = deltaA*state + delta*B*u, y = state.C + D*u, then y*silu(z)).

  selective_scan_ref computes in float32 whatever its inputs: it casts u, delta, B, C to float32
  (`.float()`), its state follows A's dtype, and A must be float32 too (with float64 A its
  contraction with the float32 C raises "expected scalar type Double but found Float"; Mamba's
  forward passes A = -exp(A_log.float())). Its output has the input's dtype (float64 here). So:
    1. With A = 0 (no decay) and u, delta, B, C on a coarse dyadic grid (k/8), no softplus, every
       float32 operation is exact: equal to the float64 loop to 1e-12 (u, delta, B, C, D and z's
       roles, the layout and the last state).
    2. With a decaying A, delta_bias and softplus on arbitrary inputs: equal to float32 accuracy.
  """
  mb = authors.mamba()
  assert mb.version == "2.3.2.post1"
  rng = np.random.default_rng(0)
  b, d, n, t = 2, 3, 4, 7
  f64 = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
  f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
  D, z = rng.normal(size=d), rng.normal(size=(b, d, t))

  grid = lambda *shape: rng.integers(-8, 9, size=shape) / 8.0  # noqa: E731
  u, delta, B, C = grid(b, d, t), np.abs(grid(b, d, t)) + 0.125, grid(b, n, t), grid(b, n, t)
  A = np.zeros((d, n))
  want, want_state = _selective_scan_numpy(u, delta, A, B, C, D, z)
  got, got_state = mb.selective_scan_ref(f64(u), f64(delta), f32(A), f64(B), f64(C), f64(D),
                                         z=f64(z), return_last_state=True)
  assert got.dtype == torch.float64
  np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
  np.testing.assert_allclose(got_state.numpy(), want_state, rtol=0, atol=1e-12)

  u, delta, B, C = (rng.normal(size=s) for s in ((b, d, t), (b, d, t), (b, n, t), (b, n, t)))
  A = -np.exp(rng.normal(size=(d, n))).astype(np.float32)  # float32 values: the same A for both
  bias = rng.normal(size=d)
  want, want_state = _selective_scan_numpy(u, delta, A.astype(np.float64), B, C, D, z,
                                           delta_bias=bias, delta_softplus=True)
  got, got_state = mb.selective_scan_ref(f64(u), f64(delta), f32(A), f64(B), f64(C), f64(D),
                                         z=f64(z), delta_bias=f64(bias), delta_softplus=True,
                                         return_last_state=True)
  np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-6 * np.abs(want).max())
  np.testing.assert_allclose(got_state.numpy(), want_state, rtol=0,
                             atol=2e-6 * np.abs(want_state).max())


def test_mamba_module_slow_path_float64():
  """Their Mamba(d_model=16) on the CPU in float64: forward over a sequence, and the same from its
  inference cache (a prompt's forward fills the states, then `step` one token at a time)."""
  mb = authors.mamba()
  torch.manual_seed(0)
  model = mb.Mamba(d_model=16, use_fast_path=False, layer_idx=0).double()
  x = torch.randn(2, 9, 16, dtype=torch.float64)
  with torch.no_grad():
    y = model(x)
    # Their InferenceParams (mamba_ssm.utils.generation) imports transformers: its two fields here.
    params = types.SimpleNamespace(key_value_memory_dict={}, seqlen_offset=0)
    prompt = model(x[:, :5], inference_params=params)
    conv_state, ssm_state = params.key_value_memory_dict[0]
    steps = []
    for s in range(5, 9):
      y_s, conv_state, ssm_state = model.step(x[:, s:s + 1], conv_state, ssm_state)
      steps.append(y_s)
  assert y.dtype == torch.float64 and y.shape == (2, 9, 16)
  assert torch.isfinite(y).all() and y.abs().max() > 1e-3
  assert conv_state.dtype == ssm_state.dtype == torch.float64
  # The scan in forward is float32 inside (selective_scan_ref's .float()); step's is float64.
  torch.testing.assert_close(torch.cat([prompt, *steps], 1), y, rtol=0, atol=1e-6)
