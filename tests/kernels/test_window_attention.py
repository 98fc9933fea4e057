"""kernels.window_attention against a float64 NumPy transcription of the official Swin forward
(microsoft/Swin-Transformer models/swin_transformer.py: SwinTransformerBlock's roll, window
partition and attention mask, WindowAttention from after `qkv` to before `proj`, window
reverse and roll back), forward and backward, on fresh random inputs.

Each test prints its random seed (shown when it fails); ZOO_TEST_SEED=<base seed> replays it (tests/conftest.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.attention.geometry import relative_position_index

PALLAS = ["pallas_tpu"]   # interpret mode on this machine
IMPLEMENTATIONS = ["xla"] + PALLAS

# (batch, height, width, window, shift, heads, head_dim)
CASES = [
    (2, 14, 14, 7, 0, 3, 4),
    (2, 14, 14, 7, 3, 3, 4),
    (1, 4, 6, 2, 0, 2, 3),
    (1, 4, 6, 2, 1, 2, 3),
    (2, 4, 6, 2, 1, 1, 5),
    (1, 7, 7, 7, 3, 3, 2),   # one window, shifted: regions still split it
]


# ------------------------------------------------------------------------------------------
# float64 NumPy transcription of the official code


def reference_index(m):
  """relative_position_index as the official WindowAttention.__init__ builds it."""
  coords = np.stack(np.meshgrid(np.arange(m), np.arange(m), indexing="ij"))   # 2, Wh, Ww
  coords_flatten = coords.reshape(2, -1)
  relative = coords_flatten[:, :, None] - coords_flatten[:, None, :]         # 2, N, N
  relative = relative.transpose(1, 2, 0).copy()
  relative[:, :, 0] += m - 1
  relative[:, :, 1] += m - 1
  relative[:, :, 0] *= 2 * m - 1
  return relative.sum(-1)


def window_partition(x, m):
  b, h, w, c = x.shape
  x = x.reshape(b, h // m, m, w // m, m, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, m, m, c)


def window_reverse(windows, m, h, w):
  b = windows.shape[0] // (h * w // m // m)
  x = windows.reshape(b, h // m, w // m, m, m, -1)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def reference_mask(h, w, m, shift, mask_value=-100.0):
  """The official attn_mask (nW, N, N), from the 3 x 3 region slicing."""
  img_mask = np.zeros((1, h, w, 1))
  slices = (slice(0, -m), slice(-m, -shift), slice(-shift, None))
  count = 0
  for hs in slices:
    for ws in slices:
      img_mask[:, hs, ws, :] = count
      count += 1
  mask_windows = window_partition(img_mask, m).reshape(-1, m * m)
  mask = mask_windows[:, None, :] - mask_windows[:, :, None]
  return np.where(mask != 0, mask_value, 0.0)


def reference(qkv, table, num_heads, m, shift, mask_value=-100.0):
  """float64 (B, H, W, C) output of the official block's attention before `proj`."""
  qkv, table = np.asarray(qkv, np.float64), np.asarray(table, np.float64)
  b, h, w, c3 = qkv.shape
  c = c3 // 3
  x = np.roll(qkv, (-shift, -shift), axis=(1, 2)) if shift else qkv
  x = window_partition(x, m).reshape(-1, m * m, c3)                             # B_, N, 3C
  b_, n, _ = x.shape
  x = x.reshape(b_, n, 3, num_heads, c // num_heads).transpose(2, 0, 3, 1, 4)
  q, k, v = x[0], x[1], x[2]
  q = q * (c // num_heads) ** -0.5
  attn = q @ k.transpose(0, 1, 3, 2)
  bias = table[reference_index(m).reshape(-1)].reshape(n, n, -1).transpose(2, 0, 1)
  attn = attn + bias[None]
  if shift:
    mask = reference_mask(h, w, m, shift, mask_value)
    nw = mask.shape[0]
    attn = (attn.reshape(b_ // nw, nw, num_heads, n, n) + mask[None, :, None]).reshape(-1, num_heads, n, n)
  attn = np.exp(attn - attn.max(-1, keepdims=True))
  attn = attn / attn.sum(-1, keepdims=True)
  out = (attn @ v).transpose(0, 2, 1, 3).reshape(b_, n, c)
  out = window_reverse(out.reshape(-1, m, m, c), m, h, w)
  return np.roll(out, (shift, shift), axis=(1, 2)) if shift else out


# ------------------------------------------------------------------------------------------


def random_inputs(rng, batch, height, width, m, heads, head_dim):
  qkv = rng.standard_normal((batch, height, width, 3 * heads * head_dim))
  table = rng.standard_normal(((2 * m - 1) ** 2, heads))  # std 1 (not 0.02): the bias matters
  return qkv.astype(np.float32), table.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("num_heads", "window_size", "shift", "implementation"))
def forward_and_vjp(qkv, table, cotangent, *, num_heads, window_size, shift, implementation="xla"):
  def attend(qkv, table):
    return kernels.window_attention(qkv, table, num_heads=num_heads, window_size=window_size,
                                    shift=shift, implementation=implementation)
  out, vjp = jax.vjp(attend, qkv, table)
  return (out, *vjp(cotangent))


def test_relative_position_index_is_official():
  for m in (1, 2, 3, 7, 12):
    np.testing.assert_array_equal(relative_position_index(m), reference_index(m))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_{}x{}_m{}_s{}_h{}_d{}".format(*c))
def test_forward_float32(rng, seed, case, implementation):
  batch, height, width, m, shift, heads, head_dim = case
  qkv, table = random_inputs(rng, batch, height, width, m, heads, head_dim)
  out = kernels.window_attention(qkv, table, num_heads=heads, window_size=m, shift=shift,
                                 implementation=implementation)
  assert out.shape == (batch, height, width, heads * head_dim) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), reference(qkv, table, heads, m, shift), rtol=1e-5,
                             atol=1e-5, err_msg=f"seed {seed}")


def test_shift_changes_the_result(rng, seed):
  """Guards against a mask or roll that silently does nothing."""
  qkv, table = random_inputs(rng, 1, 4, 6, 2, 2, 3)
  shifted = reference(qkv, table, 2, 2, 1)
  assert np.abs(shifted - reference(qkv, table, 2, 2, 0)).max() > 1e-2, f"seed {seed}"
  out = kernels.window_attention(qkv, table, num_heads=2, window_size=2, shift=1)
  np.testing.assert_allclose(np.asarray(out), shifted, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")


def test_mask_is_minus_100_not_minus_infinity(rng, seed):
  """With logits of order 100 the official finite mask lets other regions through a little."""
  qkv, table = random_inputs(rng, 1, 14, 14, 7, 3, 4)
  qkv[..., :24] *= 8.0  # q and k channels; v stays of order 1
  expected = reference(qkv, table, 3, 7, 3)
  assert np.abs(expected - reference(qkv, table, 3, 7, 3, mask_value=-1e9)).max() > 1e-2, f"seed {seed}"
  out = kernels.window_attention(qkv, table, num_heads=3, window_size=7, shift=3)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-4, atol=2e-4, err_msg=f"seed {seed}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shift", [0, 3])
def test_forward_bfloat16(rng, seed, shift, implementation):
  qkv, table = random_inputs(rng, 2, 14, 14, 7, 3, 8)
  qkv_bf16 = jnp.asarray(qkv, jnp.bfloat16)
  out = kernels.window_attention(qkv_bf16, table, num_heads=3, window_size=7, shift=shift,
                                 implementation=implementation)
  assert out.dtype == jnp.bfloat16
  expected = reference(np.asarray(qkv_bf16.astype(jnp.float32)), table, 3, 7, shift)
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected, rtol=3e-2, atol=3e-2,
                             err_msg=f"seed {seed}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_jit_and_vmap(rng, seed, implementation):
  qkv, table = random_inputs(rng, 3, 4, 6, 2, 3, 2)
  attend = functools.partial(kernels.window_attention, num_heads=3, window_size=2, shift=1,
                             implementation=implementation)
  batched = jax.jit(jax.vmap(lambda x: attend(x[None], table)[0]))(qkv)
  np.testing.assert_allclose(np.asarray(batched), reference(qkv, table, 3, 2, 1), rtol=1e-5,
                             atol=1e-5, err_msg=f"seed {seed}")
  # vmapped gradients, over the images and over bias tables, equal the unbatched ones
  loss = lambda x, t: jnp.sum(jnp.sin(attend(x[None], t)))
  grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), (0, None)))(qkv, table)
  tables = np.stack([table, 2 * table])
  table_grads = jax.jit(jax.vmap(jax.grad(loss, argnums=1), (None, 0)))(qkv[0], tables)
  for i in range(3):
    expected = jax.grad(loss, argnums=(0, 1))(qkv[i], table)
    np.testing.assert_allclose(np.asarray(grads[0][i]), np.asarray(expected[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[1][i]), np.asarray(expected[1]), rtol=1e-5, atol=1e-6)
  for i in range(2):
    expected = jax.grad(loss, argnums=1)(qkv[0], tables[i])
    np.testing.assert_allclose(np.asarray(table_grads[i]), np.asarray(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[0]],
                         ids=lambda c: "b{}_{}x{}_m{}_s{}_h{}_d{}".format(*c))
def test_backward_against_finite_differences(rng, seed, case):
  """<grad, direction> of sum(out * cotangent) vs central differences of the float64 forward."""
  batch, height, width, m, shift, heads, head_dim = case
  qkv, table = random_inputs(rng, batch, height, width, m, heads, head_dim)
  cotangent = rng.standard_normal((batch, height, width, heads * head_dim)).astype(np.float32)
  out, grad_qkv, grad_table = forward_and_vjp(qkv, table, cotangent, num_heads=heads,
                                              window_size=m, shift=shift)
  assert grad_qkv.dtype == jnp.float32 and grad_table.shape == table.shape

  def loss(q, t):
    return float(np.sum(reference(q, t, heads, m, shift) * cotangent))

  eps = 1e-4
  for _ in range(3):
    for which, grad in (("qkv", grad_qkv), ("table", grad_table)):
      direction = rng.standard_normal(grad.shape)
      if which == "qkv":
        plus, minus = loss(qkv + eps * direction, table), loss(qkv - eps * direction, table)
      else:
        plus, minus = loss(qkv, table + eps * direction), loss(qkv, table - eps * direction)
      numeric = (plus - minus) / (2 * eps)
      analytic = float(np.sum(np.asarray(grad, np.float64) * direction))
      scale = np.sqrt(np.sum(np.asarray(grad, np.float64) ** 2) * np.sum(direction ** 2))
      assert abs(analytic - numeric) <= 1e-6 * scale + 1e-5 * abs(numeric), (
          f"seed {seed}: d/d{which} along a random direction: {analytic} (vjp) vs {numeric} "
          "(finite differences)")


def test_backward_bfloat16_runs(rng, seed):
  qkv, table = random_inputs(rng, 1, 4, 6, 2, 2, 4)
  cotangent = rng.standard_normal((1, 4, 6, 8)).astype(np.float32)
  _, grad_qkv, grad_table = forward_and_vjp(jnp.asarray(qkv, jnp.bfloat16), table,
                                            jnp.asarray(cotangent, jnp.bfloat16), num_heads=2,
                                            window_size=2, shift=1)
  assert grad_qkv.dtype == jnp.bfloat16 and grad_table.dtype == jnp.float32
  _, exact_qkv, exact_table = forward_and_vjp(qkv, table, cotangent, num_heads=2, window_size=2,
                                              shift=1)
  np.testing.assert_allclose(np.asarray(grad_table), np.asarray(exact_table), rtol=5e-2, atol=5e-2,
                             err_msg=f"seed {seed}")
  np.testing.assert_allclose(np.asarray(grad_qkv.astype(jnp.float32)), np.asarray(exact_qkv),
                             rtol=5e-2, atol=5e-2, err_msg=f"seed {seed}")


@pytest.mark.parametrize("implementation", PALLAS)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], CASES[5]],
                         ids=lambda c: "b{}_{}x{}_m{}_s{}_h{}_d{}".format(*c))
def test_pallas_backward_matches_xla(rng, seed, case, implementation):
  """The Pallas backward kernel against JAX's autodiff of the XLA version (itself checked
  against finite differences of the float64 reference above)."""
  batch, height, width, m, shift, heads, head_dim = case
  qkv, table = random_inputs(rng, batch, height, width, m, heads, head_dim)
  cotangent = rng.standard_normal((batch, height, width, heads * head_dim)).astype(np.float32)
  kwargs = dict(num_heads=heads, window_size=m, shift=shift)
  expected = forward_and_vjp(qkv, table, cotangent, **kwargs)
  got = forward_and_vjp(qkv, table, cotangent, implementation=implementation, **kwargs)
  for name, a, b in zip(("out", "d_qkv", "d_table"), got, expected):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5,
                               err_msg=f"{name}, seed {seed}")


@pytest.mark.parametrize("implementation", PALLAS)
def test_pallas_backward_bfloat16(rng, seed, implementation):
  qkv, table = random_inputs(rng, 1, 14, 14, 7, 3, 8)
  cotangent = rng.standard_normal((1, 14, 14, 24)).astype(np.float32)
  args = (jnp.asarray(qkv, jnp.bfloat16), table, jnp.asarray(cotangent, jnp.bfloat16))
  got = forward_and_vjp(*args, num_heads=3, window_size=7, shift=3, implementation=implementation)
  assert got[1].dtype == jnp.bfloat16 and got[2].dtype == jnp.float32
  exact = forward_and_vjp(qkv, table, cotangent, num_heads=3, window_size=7, shift=3)
  for name, a, b in zip(("out", "d_qkv", "d_table"), got, exact):
    np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)), np.asarray(b), rtol=5e-2,
                               atol=5e-2, err_msg=f"{name}, seed {seed}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_are_deterministic(rng, seed, implementation):
  qkv, table = random_inputs(rng, 2, 14, 14, 7, 3, 4)
  cotangent = rng.standard_normal((2, 14, 14, 12)).astype(np.float32)
  kwargs = dict(num_heads=3, window_size=7, shift=3, implementation=implementation)
  first = forward_and_vjp(qkv, table, cotangent, **kwargs)
  second = forward_and_vjp(qkv, table, cotangent, **kwargs)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"seed {seed}")


@pytest.mark.parametrize("qkv_shape, table_shape, kwargs, message", [
    ((1, 14, 15, 12), (169, 2), dict(num_heads=2, window_size=7, shift=0), r"14 x 15"),
    ((1, 10, 14, 12), (169, 2), dict(num_heads=2, window_size=7, shift=3), r"10 x 14"),
    ((1, 14, 14, 12), (169, 3), dict(num_heads=2, window_size=7, shift=3), r"\(169, 2\)"),
    ((1, 14, 14, 12), (144, 2), dict(num_heads=2, window_size=7, shift=3), r"\(169, 2\)"),
    ((1, 14, 14, 10), (169, 2), dict(num_heads=2, window_size=7, shift=3), r"last dimension \(10\)"),
    ((14, 14, 12), (169, 2), dict(num_heads=2, window_size=7, shift=3), r"rank 4"),
    ((1, 14, 14, 12), (169, 2), dict(num_heads=2, window_size=7, shift=7), r"shift"),
    ((1, 14, 14, 12), (169, 2), dict(num_heads=2, window_size=7, shift=-1), r"shift"),
    ((1, 14, 14, 12), (169, 2), dict(num_heads=0, window_size=7, shift=0), r"num_heads"),
    ((1, 14, 14, 12), (169, 2), dict(num_heads=2, window_size=0, shift=0), r"window_size"),
    ((1, 14, 14, 12), (169, 2), dict(num_heads=2, window_size=7, shift=3,
                                     implementation="pallas_gpu"), r"head_dim \(2\) must be a multiple of 16"),
    ((1, 18, 18, 96), (289, 2), dict(num_heads=2, window_size=9, shift=0,
                                     implementation="pallas_gpu"), r"at most 64 fit"),
    ((1, 14, 14, 12), (169, 2), dict(num_heads=2, window_size=7, shift=3,
                                     implementation="cuda"), r"not one of"),
])
def test_bad_arguments_raise(qkv_shape, table_shape, kwargs, message):
  with pytest.raises(ValueError, match=message):
    kernels.window_attention(np.zeros(qkv_shape, np.float32), np.zeros(table_shape, np.float32), **kwargs)


# ------------------------------------------------------------------------------------------
# The Mosaic GPU kernel (GPU interpreter here: slow, so few and small cases). It takes head
# dims that are multiples of 16 and windows up to 8 x 8, so it has cases of its own.

GPU_CASES = [
    pytest.param((1, 14, 14, 7, 3, 1, 16), jnp.float32, id="f32_14x14_m7_s3"),
    pytest.param((1, 14, 14, 7, 3, 2, 16), jnp.bfloat16, id="bf16_14x14_m7_s3"),
    pytest.param((1, 8, 8, 4, 0, 2, 16), jnp.float32, id="f32_8x8_m4_s0", marks=pytest.mark.slow),
    pytest.param((2, 8, 12, 4, 2, 1, 32), jnp.float32, id="f32_8x12_m4_s2_d32", marks=pytest.mark.slow),
    pytest.param((1, 7, 7, 7, 3, 1, 16), jnp.float32, id="f32_one_window_s3", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case, dtype", GPU_CASES)
def test_pallas_gpu_forward_and_backward(rng, seed, case, dtype):
  batch, height, width, m, shift, heads, head_dim = case
  qkv, table = random_inputs(rng, batch, height, width, m, heads, head_dim)
  cotangent = rng.standard_normal((batch, height, width, heads * head_dim)).astype(np.float32)
  args = (jnp.asarray(qkv, dtype), table, jnp.asarray(cotangent, dtype))
  kwargs = dict(num_heads=heads, window_size=m, shift=shift)
  got = forward_and_vjp(*args, implementation="pallas_gpu", **kwargs)
  expected = forward_and_vjp(*args, **kwargs)
  assert [a.dtype for a in got] == [a.dtype for a in expected]
  tolerance = 2e-5 if dtype == jnp.float32 else 5e-2
  for name, a, b in zip(("out", "d_qkv", "d_table"), got, expected):
    np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)),
                               rtol=tolerance, atol=tolerance, err_msg=f"{name}, seed {seed}")
  if dtype == jnp.float32:
    np.testing.assert_allclose(np.asarray(got[0]), reference(qkv, table, heads, m, shift),
                               rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
  again = forward_and_vjp(*args, implementation="pallas_gpu", **kwargs)
  for a, b in zip(got, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"seed {seed}")


def test_auto_falls_back_to_xla_where_the_gpu_kernel_cannot_go():
  """On a Hopper GPU, "auto" runs xla for head dims the GPU kernel does not take."""
  qkv, table = np.ones((1, 4, 4, 6), np.float32), np.zeros((9, 1), np.float32)
  with kernels.lowering_for("gpu"):
    text = jax.jit(lambda q, t: kernels.window_attention(q, t, num_heads=1, window_size=2, shift=1)
                   ).lower(qkv, table).as_text()
  assert "mosaic_gpu" not in text


def test_integer_input_raises():
  with pytest.raises(ValueError, match="floating point"):
    kernels.window_attention(np.zeros((1, 2, 2, 6), np.int32), np.zeros((9, 2), np.float32),
                             num_heads=2, window_size=2, shift=0)
