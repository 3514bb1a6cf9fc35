"""xLSTM (jaxrnn/blocks/xlstm.py, around the mlstm_memory and slstm cells of jaxrnn/cells.py)
against NX-AI's xlstm 2.0.6, the authors' own PyTorch code, run unchanged (tests/authors.py): a
stack of mLSTM blocks with an sLSTM block, its final norm included, on the same weights
(outputs, final states, gradients); the mLSTM's normalizer where exp(-m) overflows float32;
and the initialisation, tensor by tensor, against the authors' reset_parameters().

Which of the authors' paths, at what tolerance: their mLSTM has two forms, which differ by
~1e-7 on their own. Their training path (`forward`, backend parallel_stabilized_simple)
stabilises step t by m_t = max_s log D_ts, their token-by-token path (`step`, backend
recurrent_step_stabilized_simple) by the carried m_t = max(log f_t + m_{t-1}, i_t) from m_0 = 0,
which also counts the zero state's F_t = log f_1 + ... + log f_t: the two differ where that
is the larger (every i_s so far below its F_s). The normalizer's epsilon (1e-6) is added
after the scaling, so it enters as eps * exp(m_t), and the paths differ by ~eps (with eps = 0
they agree within 3e-15). Both of jaxrnn's forms take the carried stabiliser (its chunkwise
parallel form folds in the carried m, as the authors' chunkwise_simple does), so both equal
the authors' `step`: the stack is compared with that path at 1e-10 in float64 (outputs,
final states, gradients), and with their `forward` within eps times the largest entry
(measured: 7e-8 of outputs up to 3.4, 7e-7 of gradients up to 47).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import authors
from configs import default
from jaxrnn import blocks, cells

B, T, SPLIT = 2, 11, 4  # a sequence of T steps, run by jaxrnn as [0, SPLIT) then [SPLIT, T)
WIDTH, HEADS, LAYERS, SLSTM_AT = 32, 4, 3, (1,)  # mLSTM, sLSTM, mLSTM
TOL = 1e-10  # float64
EPS = 1e-6  # the authors' mLSTM normalizer epsilon (backends.py)


def _model_config(width=WIDTH, num_layers=LAYERS, slstm_at=SLSTM_AT, impl="scan"):
  config = default.get_config().model
  config.update(block="xlstm", cell="mlstm", hidden_size=width, embed_dim=width,
                num_layers=num_layers, num_heads=HEADS, slstm_at=slstm_at, conv_width=4,
                expand=2, impl=impl)
  return config


def _authors_stack(xl, width=WIDTH, num_layers=LAYERS, slstm_at=SLSTM_AT):
  """The authors' xLSTMBlockStack: mLSTM blocks (4 heads, conv 4, qkv blocks of 4, factor 2)
  with sLSTM blocks at slstm_at (4 heads, conv 4, backend "vanilla": the CPU one, feed-forward
  1.3x gated gelu), no biases, no dropout, the final norm; their init (reset_parameters)."""
  config = xl.xLSTMBlockStackConfig(
      mlstm_block=xl.mLSTMBlockConfig(mlstm=xl.mLSTMLayerConfig(
          conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=HEADS, proj_factor=2.0)),
      slstm_block=xl.sLSTMBlockConfig(
          slstm=xl.sLSTMLayerConfig(backend="vanilla", num_heads=HEADS, conv1d_kernel_size=4),
          feedforward=xl.FeedForwardConfig(proj_factor=1.3, act_fn="gelu")),
      context_length=T, num_blocks=num_layers, embedding_dim=width, slstm_at=list(slstm_at),
      bias=False, dropout=0.0, add_post_blocks_norm=True)
  stack = xl.xLSTMBlockStack(config)
  stack.reset_parameters()
  return stack


def _from_authors(tensors, num_layers=LAYERS):
  """jaxrnn's params ({"layers", "norm"}, as blocks.init's) from the authors' parameters by
  name (a state_dict, or their gradients by the same names). Their LayerNorm weights are
  1 + w like jaxrnn's scales; LinearHeadwiseExpand weights are <heads, out, in>, jaxrnn's
  <heads, in, out>; their sLSTMLayer names `fgate` the weights that make the input gate's
  pre-activation and `igate` the forget gate's (forward: `i, f = fgate(x), igate(x)`), jaxrnn
  names each for the gate it feeds; the vanilla sLSTM cell keeps its bias gate-major
  (i, f, z, o) x heads, as jaxrnn, and its recurrent kernel as <heads, 4 dh, dh>."""
  p = {name: t.detach().numpy().copy() for name, t in tensors.items()}  # not views: reset_ redraws
  headwise = lambda name: {"w": np.swapaxes(p[name], 1, 2)}
  conv = lambda name: {"w": p[f"{name}.weight"][:, 0, :].T, "b": p[f"{name}.bias"]}
  layers = []
  for i in range(num_layers):
    at, xl = f"blocks.{i}.", f"blocks.{i}.xlstm."
    if f"{xl}slstm_cell._bias_" in p:
      up = p[f"{at}ffn.proj_up.weight"].T  # <h, 2m>: (gate, value)
      m = up.shape[1] // 2
      layers.append({
          "norm": p[f"{at}xlstm_norm.weight"], "conv": conv(f"{xl}conv1d.conv"),
          "igate": headwise(f"{xl}fgate.weight"), "fgate": headwise(f"{xl}igate.weight"),
          "zgate": headwise(f"{xl}zgate.weight"), "ogate": headwise(f"{xl}ogate.weight"),
          "w_hh": np.swapaxes(p[f"{xl}slstm_cell._recurrent_kernel_"], 1, 2),
          "b": p[f"{xl}slstm_cell._bias_"], "group_norm": p[f"{xl}group_norm.weight"],
          "ffn_norm": p[f"{at}ffn_norm.weight"],
          "ffn": {"up": {"w": np.stack([up[:, :m], up[:, m:]])},
                  "down": {"w": p[f"{at}ffn.proj_down.weight"].T}}})
    else:
      cell = f"{xl}mlstm_cell."
      layers.append({
          "norm": p[f"{at}xlstm_norm.weight"], "proj_up": {"w": p[f"{xl}proj_up.weight"].T},
          "conv": conv(f"{xl}conv1d.conv"),
          **{name: headwise(f"{xl}{name}_proj.weight") for name in "qkv"},
          "igate": {"w": p[f"{cell}igate.weight"].T, "b": p[f"{cell}igate.bias"]},
          "fgate": {"w": p[f"{cell}fgate.weight"].T, "b": p[f"{cell}fgate.bias"]},
          "outnorm": p[f"{cell}outnorm.weight"], "skip": p[f"{xl}learnable_skip"],
          "proj_down": {"w": p[f"{xl}proj_down.weight"].T}})
  return {"layers": layers, "norm": p["post_blocks_norm.weight"]}


def _jaxrnn_init(model_config, key):
  n, h = model_config.num_layers, model_config.hidden_size
  return blocks.init(list(jax.random.split(key, n)), model_config, h, [h] * n, 1)


def _authors_step(stack, x):
  """The authors' token-by-token path over x<b, t, h> from their zero state -> (y, state).
  Their convolution's step shifts its state in place (conv1d_step), so each step gets a copy
  of the last one's state: else autograd finds a tensor it saved overwritten."""
  state, ys = None, []
  for t in range(x.shape[1]):
    if state is not None:
      state = {block: {name: (tuple(v.clone() for v in s) if isinstance(s, tuple) else s.clone())
                       for name, s in entry.items()} for block, entry in state.items()}
    y, state = stack.step(x[:, t:t + 1], state)
    ys.append(y)
  return torch.cat(ys, dim=1), state


def _jaxrnn_run(params, x, model_config):
  """jaxrnn's stack (blocks.run: the final norm included) over x[:, :SPLIT], then the rest
  from the carried state -> (final carries, y)."""
  carries = jax.tree.map(lambda v: jnp.zeros(v.shape, x.dtype),
                         blocks.initial_carry(model_config, x.shape[0],
                                              [model_config.hidden_size] * model_config.num_layers))
  carries, first = blocks.run(params, carries, x[:, :SPLIT], model_config=model_config)
  carries, rest = blocks.run(params, carries, x[:, SPLIT:], model_config=model_config)
  return carries, jnp.concatenate([first, rest], axis=1)


def _close(got, want, atol, name="", rtol=0.0):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol, err_msg=name)


def test_the_stack_equals_the_authors():
  """Three blocks (mLSTM, sLSTM, mLSTM; width 32, 4 heads, mLSTM inner width 64, sLSTM
  feed-forward 64) and the final norm in float64, the authors' init then every parameter
  moved by N(0, 0.1^2) (off their zeros and constants: the gate weights' and the recurrent
  kernel's layouts then show in the outputs too), jaxrnn's run in two calls (4 and 7 steps)
  with the carries passed between them, under impl scan (the mLSTM's step form) and fused (its
  chunkwise parallel form), against the authors' token-by-token `step` within 1e-10:
  - the outputs;
  - the final carries: each convolution's last 3 inputs (the last 3 of their 4), the mLSTM's
    (C, n, m) (its h is no input of its step, and theirs keeps none), the sLSTM's (h, c, n, m);
  - the gradient of sum(w * y) with respect to every parameter and the input (torch autograd
    through their steps);
  and against their `forward` (their training path), outputs and gradients, within eps = 1e-6
  of the largest entry (the module docstring says why not 1e-10)."""
  xl = authors.xlstm()
  torch.manual_seed(0)
  stack = _authors_stack(xl).double()
  with torch.no_grad():
    for weight in stack.parameters():
      weight.add_(0.1 * torch.randn_like(weight))
  x = torch.randn(B, T, WIDTH, dtype=torch.float64, requires_grad=True)
  w = torch.randn(B, T, WIDTH, dtype=torch.float64)
  names, weights = zip(*stack.named_parameters())

  def gradients(y):  # of sum(w * y): the input's, then the parameters' as jaxrnn's leaves
    x_grad, *grads = torch.autograd.grad(torch.sum(w * y), (x, *weights))
    return [x_grad.numpy(), *jax.tree.leaves(_from_authors(dict(zip(names, grads))))]

  y_step, state = _authors_step(stack, x)
  y_forward = stack(x)
  grads_step, grads_forward = gradients(y_step), gradients(y_forward)
  for impl in ("scan", "fused"):
    _check_against_the_authors(_model_config(impl=impl), stack, x, w, y_step, state, y_forward,
                               grads_step, grads_forward)


def _check_against_the_authors(model_config, stack, x, w, y_step, state, y_forward, grads_step,
                               grads_forward):
  """One of jaxrnn's forms (model_config.impl) against the authors' paths, as the test says."""
  def loss(params, x):
    carries, y = _jaxrnn_run(params, x, model_config)
    return jnp.sum(jnp.asarray(w.numpy()) * y), (carries, y)

  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, _from_authors(stack.state_dict()))
    init = _jaxrnn_init(model_config, jax.random.key(0))
    assert jax.tree.structure(params) == jax.tree.structure(init)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, init)
    (_, (carries, y)), (grads, x_grad) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
        params, jnp.asarray(x.detach().numpy()))
  got_grads = [x_grad, *jax.tree.leaves(grads)]
  what = ["the input", *(jax.tree_util.keystr(path)
                         for path, _ in jax.tree_util.tree_leaves_with_path(grads))]
  _close(y, y_step.detach().numpy(), TOL, "outputs")
  for i, (carry, theirs) in enumerate(zip(carries, state.values(), strict=True)):
    conv_state, cell_state = carry
    theirs = jax.tree.map(lambda v: v.detach().numpy(), theirs)
    _close(conv_state, theirs["conv_state"][0][:, 1:], TOL, f"layer {i}'s conv state")
    if i in SLSTM_AT:
      for name, a, b in zip("hcnm", cell_state, theirs["slstm_state"], strict=True):
        _close(a, b, TOL, f"layer {i}'s sLSTM {name}")
    else:
      c, n, m = theirs["mlstm_state"]
      for name, a, b in zip("Cnm", cell_state[1:], (c, n[..., 0], m[..., 0, 0]), strict=True):
        _close(a, b, TOL, f"layer {i}'s mLSTM {name}")
  for name, a, b in zip(what, got_grads, grads_step, strict=True):
    _close(a, b, TOL, f"{name}'s gradient")
  want = y_forward.detach().numpy()
  _close(y, want, EPS * np.abs(want).max(), "outputs against forward")
  largest = max(np.abs(g).max() for g in grads_forward)
  for name, a, b in zip(what, got_grads, grads_forward, strict=True):
    _close(a, b, EPS * largest, f"{name}'s gradient against forward")


def _mlstm_gates_at_minus_200():
  """gx<b, t, 3h + 2 heads> and a carry for the mLSTM memory (2 heads of 2, b 2, 5 steps) whose
  stabilizer m is -100 and -200 in the carry, -150 after step 0 (i -150, f -60) and -200 after
  step 1 (i -200), where exp(-m) is past float32's largest number (m < -88.7); then the gates
  open (i, f ~ N(0, 1)) and m is i, so steps 2 to 4 give outputs of order 1."""
  b, t, heads, d = 2, 5, 2, 2
  rng = np.random.default_rng(5)
  qkv = rng.normal(size=(b, t, 3 * heads * d))
  i, f = rng.normal(size=(2, b, t, heads))
  i[:, :2] += np.array([-150.0, -200.0])[:, None]
  f[:, :2] -= 60.0
  carry = (np.zeros((b, heads * d)), rng.normal(size=(b, heads, d, d)),
           rng.normal(size=(b, heads, d)), np.array([[-100.0, -200.0], [-200.0, -100.0]]))
  return np.concatenate([qkv, i, f], axis=-1), carry


def _authors_mlstm(backends, gx, c, n, m):
  """The authors' recurrent_step_stabilized_simple step by step (the backend that takes a
  carried state) on the layout of `_mlstm_gates_at_minus_200`, torch float64 -> (h<b, t, h>,
  (C, n, m) as jaxrnn's carry). Their step squeezes q, k, v in place: each gets its own copy."""
  b, t, (heads, d) = *gx.shape[:2], n.shape[1:]
  q, k, v = (gx[..., j * heads * d:(j + 1) * heads * d].reshape(b, t, heads, d).transpose(1, 2)
             for j in range(3))
  i, f = (gx[..., 3 * heads * d + j * heads:][..., :heads].transpose(1, 2)[..., None]
          for j in range(2))
  state, hs = (c, n[..., None], m[..., None, None]), []
  for s in range(t):
    h, state = backends.recurrent_step_stabilized_simple(
        *state, *(u[:, :, s:s + 1].clone() for u in (q, k, v, i, f)))
    hs.append(h)
  return torch.cat(hs, dim=2).transpose(1, 2).reshape(b, t, -1), (
      state[0], state[1][..., 0], state[2][..., 0, 0])


@pytest.mark.parametrize("form", ["step", "parallel"])
def test_mlstm_normalizer_stays_finite_where_exp_minus_m_overflows(form):
  """The mLSTM memory's normalizer max(|q n|, exp(-m)) at m = -150 and -200 (a run of closed
  gates, as training at lr 3e-2 reached), in the step form (lax.scan of `recur`) and the
  chunked parallel form, in float32, against the authors' recurrent_step_stabilized_simple in
  float64 (their `step`'s backend, which takes a carried state; their `forward`'s starts from
  zeros): outputs and final carry within 1e-5 (absolute and relative), and the gradient of
  sum(w * h) with respect to every gate input and the carry (C, n, m) finite and within 1e-5
  of the largest entry of theirs (torch autograd; those of steps 0 and 1 and of the carry are
  ~1e-70: nothing weighted by exp(m) reaches an output of order 1). exp(-m) overflowed to inf
  there: h stayed finite (a finite numerator over inf) and its gradient was NaN (0 * inf),
  which stopped training for good."""
  xl = authors.xlstm()
  gx, carry = _mlstm_gates_at_minus_200()
  w = np.random.default_rng(6).normal(size=gx.shape[:2] + (carry[0].shape[-1],))
  inputs = [torch.tensor(v, requires_grad=True) for v in (gx, *carry[1:])]
  h, want_carry = _authors_mlstm(xl.mlstm_backends, *inputs)
  want_grads = torch.autograd.grad(torch.sum(torch.tensor(w) * h), inputs)
  cell = cells.mlstm_memory(num_heads=2)
  run = {"step": lambda c, g: jax.lax.scan(lambda c, x: cell.recur({}, c, x), c, g),
         "parallel": lambda c, g: cell.parallel({}, c, g)}[form]

  def forward(gx, carry):  # batch-major, as the block; the forms take time-major gx
    carry, hs = run(carry, jnp.swapaxes(gx, 0, 1))
    return carry, jnp.swapaxes(hs, 0, 1)

  f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  (_, *got_carry), got = jax.jit(forward)(f32(gx), f32(carry))
  _close(got, h.detach().numpy(), 1e-5, "h", rtol=1e-5)
  for name, a, b in zip("Cnm", got_carry, want_carry, strict=True):
    _close(a, b.detach().numpy(), 1e-5, name, rtol=1e-5)
  loss = lambda gx, carry: jnp.sum(w * forward(gx, carry)[1])
  got_grads = jax.jit(jax.grad(loss, (0, 1)))(f32(gx), f32(carry))
  got_grads = [got_grads[0], *got_grads[1][1:]]  # h is no input of the mLSTM's step
  largest = max(np.abs(g.numpy()).max() for g in want_grads)
  for name, got_grad, want_grad in zip(("gx", "C", "n", "m"), got_grads, want_grads,
                                       strict=True):
    assert np.isfinite(np.asarray(got_grad)).all(), f"NaN or inf in the gradient of {name}"
    _close(got_grad, want_grad.numpy(), 1e-5 * largest, name, rtol=1e-5)


SMALL, DRAWS = 100, 100  # tensors under SMALL entries (the mLSTM's i-gate bias, one a head)
# are compared pooled over DRAWS inits of each


def test_the_initialisation_is_the_authors():
  """jaxrnn's init of 4 blocks (width 128, 4 heads, an sLSTM block at layer 1: its forget
  bias's exponent 0.3 + 1.3 / 3 depends on the layer) against the authors' reset_parameters()
  at the same shapes, tensor by tensor: the fixed ones equal (norm weights 0, skip 1, the
  mLSTM's gate weights 0 and forget bias 3 to 6 over the heads, the sLSTM's recurrent kernel 0
  and its whole bias: 0 but the forget gate's powerlaw_blockdependent curve); the random ones
  by mean, std (within 5 standard errors) and range (within 30%), as
  tests/test_griffin.py::test_the_initialisation_is_recurrentgemmas: "small init" N(0, 2/5h),
  Wang's N(0, (2 / layers / sqrt(h))^2), torch's Conv1d U(+-1/2), the i-gate bias N(0, 0.1^2)
  (4 entries a layer: pooled over 100 inits of each)."""
  xl = authors.xlstm()
  width, num_layers, slstm_at = 128, 4, (1,)
  model_config = _model_config(width, num_layers, slstm_at)
  torch.manual_seed(0)
  stack = _authors_stack(xl, width, num_layers, slstm_at)
  theirs = _from_authors(stack.state_dict(), num_layers)
  init = jax.jit(lambda key: _jaxrnn_init(model_config, key))
  keys = jax.random.split(jax.random.key(1), DRAWS)
  ours = init(keys[0])
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  small = lambda tree: {jax.tree_util.keystr(path): np.asarray(v)
                        for path, v in jax.tree_util.tree_leaves_with_path(tree) if v.size < SMALL}
  pooled_ours, pooled_theirs = [small(init(key)) for key in keys], [small(theirs)]
  for _ in range(DRAWS - 1):
    stack.reset_parameters()  # redraws all but the sLSTM's convolution (not SMALL)
    pooled_theirs.append(small(_from_authors(stack.state_dict(), num_layers)))
  fixed = {f"['layers'][{i}]['fgate']['b']" for i in range(num_layers) if i not in slstm_at}
  fixed |= {f"['layers'][{i}]['b']" for i in slstm_at}
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs),
                          strict=True):
    name, a = jax.tree_util.keystr(path), np.asarray(a)
    assert a.shape == b.shape, name
    if np.ptp(b) == 0:
      np.testing.assert_array_equal(a, b, err_msg=name)
      continue
    if name in fixed:  # float32 x^p within an ulp of torch's (another pow), then times 12
      _close(a, b, 16 * np.finfo(np.float32).eps, name)
      continue
    if a.size < SMALL:
      a, b = (np.stack([draw[name] for draw in pooled]) for pooled in (pooled_ours, pooled_theirs))
    # Two samples of n draws: their means differ by ~ std * sqrt(2 / n), their stds by a
    # fraction ~ 1 / sqrt(n); 5 of those is chance once in millions.
    n, scale = a.size, b.std()
    assert abs(a.mean() - b.mean()) < 5 * scale * np.sqrt(2 / n), (name, a.mean(), b.mean())
    assert abs(a.std() / scale - 1) < 5 / np.sqrt(n), (name, a.std(), scale)
    assert abs(np.ptp(a) / np.ptp(b) - 1) < 0.3, (name, np.ptp(a), np.ptp(b))
