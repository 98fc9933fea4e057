"""kernels.dense_crf against the float64 NumPy brute force in crf_reference.py (every pair of
pixels, full N x N kernels), forward and gradients (central finite differences of the float64
reference), on fresh random inputs; the Pallas TPU kernel in interpret mode against both.

Each test prints its random seed (shown when it fails); ZOO_TEST_SEED=<base seed> replays it (tests/conftest.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.crf import api as crf_api
from kernels.crf import xla as crf_xla
from kernels.crf.geometry import BlockSizes
from tests.kernels import crf_reference
from tests.lowering import export, kernel_calls

# (batch, height, width, labels, channels, parameters)
CASES = [
    # DeepLab's defaults on a 0..255 image: the narrow colour kernel (std 3) separates regions.
    (2, 7, 9, 3, 3, dict(pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0, bi_rgb_std=3.0)),
    # a wide colour kernel and a short position one: most pairs count.
    (1, 12, 10, 5, 3, dict(pos_w=0.5, pos_xy_std=2.0, bi_w=0.08, bi_xy_std=4.0, bi_rgb_std=60.0)),
    # one grey channel in [0, 1].
    (1, 6, 8, 4, 1, dict(pos_w=2.0, pos_xy_std=0.7, bi_w=3.0, bi_xy_std=3.0, bi_rgb_std=0.2)),
]
IDS = ["deeplab-defaults", "wide-colour", "grey"]


def random_image(rng, b, h, w, c, scale):
  """Piecewise-constant regions (a few random colours in random half-planes) plus noise."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  image = np.zeros((b, h, w, c))
  for n in range(b):
    image[n] = rng.uniform(0, scale, c)
    for _ in range(2):
      a, d = rng.normal(size=2), rng.uniform(-1, 1) * (h + w) / 4
      region = (rows - h / 2) * a[0] + (cols - w / 2) * a[1] > d
      image[n][region] = rng.uniform(0, scale, c)
  image += rng.normal(0, scale / 100, image.shape)
  return image.astype(np.float32)


def random_inputs(rng, b, h, w, l, c, params):
  scale = 1.0 if c == 1 else 255.0
  logits = rng.normal(0, 2, (b, h, w, l)).astype(np.float32)
  return logits, random_image(rng, b, h, w, c, scale)


def random_compatibility(rng, l):
  return (1.0 - np.eye(l) + rng.uniform(-0.4, 0.4, (l, l))).astype(np.float32)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bilateral_filter_matches_brute_force(rng, case):
  b, h, w, l, c, params = case
  _, image = random_inputs(rng, b, h, w, l, c, params)
  q = rng.uniform(0, 1, (b, h, w, l)).astype(np.float32)
  out = crf_api.bilateral_filter(q, image, bi_xy_std=params["bi_xy_std"],
                                          bi_rgb_std=params["bi_rgb_std"], implementation="xla")
  expected = crf_reference.bilateral_filter(q, image, params["bi_xy_std"], params["bi_rgb_std"])
  np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("potts", [True, False], ids=["potts", "compatibility"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_matches_brute_force(rng, case, potts):
  b, h, w, l, c, params = case
  logits, image = random_inputs(rng, b, h, w, l, c, params)
  mu = None if potts else random_compatibility(rng, l)
  q = kernels.dense_crf(logits, image, iterations=5, compatibility=mu, implementation="xla", **params)
  expected = crf_reference.dense_crf(logits, image, 5, compatibility=mu, **params)
  assert q.shape == logits.shape and q.dtype == jnp.float32
  # Mean field near a tie amplifies rounding (some random scenes move Q by 1e-4 in float32):
  # the tolerance grows with how far the float64 reference itself moves when the logits move
  # by one float32 rounding (relative 6e-8), times 100 for the roundings along 5 iterations.
  moved = crf_reference.dense_crf(logits * (1 + 6e-8 * rng.standard_normal(logits.shape)), image,
                                  5, compatibility=mu, **params)
  atol = 2e-5 + 100 * np.abs(moved - expected).max()
  np.testing.assert_allclose(q, expected, rtol=1e-4, atol=atol)
  np.testing.assert_allclose(np.sum(q, axis=-1), 1.0, atol=1e-5)
  # The CRF changes the unaries' answer (the test would not notice a missing pairwise term).
  assert np.abs(expected - crf_reference.softmax(logits.astype(np.float64))).max() > 1e-2


def test_query_chunks_and_padding(rng, monkeypatch):
  """A tiny working-set budget forces several query chunks, the last one padded."""
  b, h, w, l, c, params = CASES[1]
  logits, image = random_inputs(rng, b, h, w, l, c, params)
  expected = crf_reference.dense_crf(logits, image, 3, **params)
  monkeypatch.setattr(crf_xla, "BLOCK_ELEMENTS", 16 * h * w)
  monkeypatch.setattr(crf_xla, "BLOCK_ELEMENTS_CPU", 16 * h * w)
  assert crf_xla.chunk_size(h * w, b) == 16
  q = kernels.dense_crf(logits, image, iterations=3, implementation="xla", **params)
  np.testing.assert_allclose(q, expected, rtol=1e-4, atol=2e-5)


def _loss_weights(rng, shape):
  return rng.normal(size=shape)


@pytest.mark.parametrize("case", CASES[:2], ids=IDS[:2])
def test_gradients_match_finite_differences(rng, case):
  b, h, w, l, c, params = case
  if b > 1:
    h, w = 5, 6   # keep the reference's finite differences quick
  logits, image = random_inputs(rng, b, h, w, l, c, params)
  image = image[:b, :h, :w]
  mu = random_compatibility(rng, l)
  weights = _loss_weights(rng, (b, h, w, l))
  iterations = 4
  fixed = {k: v for k, v in params.items() if k not in ("pos_w", "bi_w")}
  # Weights of at most 1 keep Q away from one-hot rows, whose gradients vanish.
  params = dict(params, pos_w=min(params["pos_w"], 1.0), bi_w=min(params["bi_w"], 1.0))

  def loss(logits, pos_w, bi_w, mu):
    q = kernels.dense_crf(logits, image, iterations=iterations, pos_w=pos_w, bi_w=bi_w,
                          compatibility=mu, implementation="xla", **fixed)
    return jnp.sum(q * weights)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(
      logits, jnp.float32(params["pos_w"]), jnp.float32(params["bi_w"]), mu)

  def reference_loss(logits=logits, pos_w=params["pos_w"], bi_w=params["bi_w"], mu=mu):
    q = crf_reference.dense_crf(logits, image, iterations, pos_w=pos_w, bi_w=bi_w,
                                compatibility=mu, **fixed)
    return float(np.sum(q * weights))

  fd = crf_reference.finite_difference
  expected = (fd(lambda x: reference_loss(logits=x), logits),
              fd(lambda x: reference_loss(pos_w=float(x)), params["pos_w"]),
              fd(lambda x: reference_loss(bi_w=float(x)), params["bi_w"]),
              fd(lambda x: reference_loss(mu=x), mu))
  assert np.abs(expected[0]).max() > 1e-3, "saturated CRF: the test would not see wrong gradients"
  for name, got, want in zip(("logits", "pos_w", "bi_w", "compatibility"), grads, expected):
    # The weights' gradients are sums over every pixel that may nearly cancel: float32 leaves
    # an absolute error around 1e-7 there.
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max() + 1e-6,
                               err_msg=name)


def test_jit_with_traced_weights_and_zero_iterations(rng):
  b, h, w, l, c, params = CASES[0]
  logits, image = random_inputs(rng, b, h, w, l, c, params)
  fixed = {k: v for k, v in params.items() if k not in ("pos_w", "bi_w")}
  fn = jax.jit(lambda lo, pw, bw: kernels.dense_crf(lo, image, iterations=2, pos_w=pw, bi_w=bw,
                                                    implementation="xla", **fixed))
  np.testing.assert_allclose(fn(logits, 3.0, 4.0),
                             crf_reference.dense_crf(logits, image, 2, **params), rtol=1e-4, atol=2e-5)
  q0 = kernels.dense_crf(logits, image, iterations=0)
  np.testing.assert_allclose(q0, crf_reference.softmax(logits.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_vmap_matches_the_batch_axis(rng):
  b, h, w, l, c, params = CASES[0]
  logits, image = random_inputs(rng, b, h, w, l, c, params)
  mapped = jax.vmap(lambda lo, im: kernels.dense_crf(lo[None], im[None], iterations=2,
                                                     implementation="xla", **params)[0])(logits, image)
  batched = kernels.dense_crf(logits, image, iterations=2, implementation="xla", **params)
  np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-6)


def test_integer_image_and_bfloat16_logits(rng):
  b, h, w, l, c, params = CASES[0]
  logits, image = random_inputs(rng, b, h, w, l, c, params)
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  q = kernels.dense_crf(logits.astype(jnp.bfloat16), image, iterations=3, implementation="xla")
  assert q.dtype == jnp.bfloat16
  expected = crf_reference.dense_crf(np.asarray(logits.astype(jnp.bfloat16), np.float64), image, 3)
  np.testing.assert_allclose(np.asarray(q, np.float32), expected, atol=1e-2)


@pytest.mark.parametrize("change, message", [
    (dict(image=np.zeros((1, 7, 8, 3))), "resize the logits"),
    (dict(image=np.zeros((7, 9, 3))), "image must have shape"),
    (dict(logits=np.zeros((7, 9, 3))), "logits must have rank 4"),
    (dict(logits=np.zeros((1, 7, 9, 3), np.int32)), "floating point"),
    (dict(bi_rgb_std=0.0), "bi_rgb_std must be a positive"),
    (dict(pos_xy_std=-1.0), "pos_xy_std must be a positive"),
    (dict(bi_xy_std=float("inf")), "bi_xy_std must be a positive"),
    (dict(bi_rgb_std=np.ones(1)), "bi_rgb_std must be a Python float"),
    (dict(compatibility=np.ones((3, 4))), r"compatibility must have shape \(L, L\) = \(3, 3\)"),
    (dict(compatibility=np.ones((3,))), r"compatibility must have shape"),
    (dict(iterations=-1), "iterations must be a non-negative int"),
    (dict(iterations=2.5), "iterations must be a non-negative int"),
    (dict(pos_w=np.ones(2)), "pos_w must be a scalar"),
    (dict(implementation="cuda"), "is not one of"),
    (dict(implementation="pallas_tpu", block_sizes=BlockSizes(query=100)),
     "block_sizes must have query a positive multiple of 128"),
    (dict(implementation="pallas_gpu", image=np.zeros((1, 7, 9, 40))), "at most 29 channels"),
])
def test_bad_arguments_raise_clear_errors(change, message):
  arguments = dict(logits=np.zeros((1, 7, 9, 3), np.float32), image=np.zeros((1, 7, 9, 3)))
  arguments.update(change)
  logits, image = arguments.pop("logits"), arguments.pop("image")
  with pytest.raises(ValueError, match=message):
    kernels.dense_crf(logits, image, **arguments)


def test_traced_std_is_rejected():
  with pytest.raises(ValueError, match="bi_rgb_std must be a Python float"):
    jax.jit(lambda s: kernels.dense_crf(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 4, 3)),
                                        bi_rgb_std=s))(3.0)


# ------------------------------------------------------------------------------------------
# Pallas kernels in interpret mode (each call takes seconds there: few, small cases).

PALLAS = ["pallas_tpu", "pallas_gpu"]
SMALL_TILES = BlockSizes(query=128, key_tiles=1)


def pallas_tolerance(image, params):
  """Error bound of a kernel value (<= 1) from the matrix-unit expansion (kernels/crf/pallas_tpu.py's
  doc): (D + 2) 2^-25 (2 r + 7.4)^2 with r a tile's feature radius; here 2 r <= the whole
  image's feature-box diagonal."""
  colour = image.reshape(-1, image.shape[-1]) / params["bi_rgb_std"]
  position = np.array(image.shape[1:3]) / params["bi_xy_std"]
  diagonal = np.sqrt(np.sum((colour.max(0) - colour.min(0)) ** 2) + np.sum(position ** 2))
  d = image.shape[-1] + 2
  return (d + 2) * 2.0 ** -25 * (diagonal + 7.4) ** 2


# The GPU kernel's tiles are fixed (64 pixels): block_sizes only matter on the TPU. By default
# every case runs on the TPU kernel with its default tiles and the first on the GPU kernel;
# -m slow adds the rest (each interpret-mode call takes seconds).
_TPU_DEFAULT, _GPU = ("pallas_tpu", BlockSizes()), ("pallas_gpu", BlockSizes())
FILTER_CASES = (
    [pytest.param(*_TPU_DEFAULT, case, id=f"{name}-tpu") for case, name in zip(CASES, IDS)]
    + [pytest.param("pallas_tpu", SMALL_TILES, case, id=f"{name}-tpu-small", marks=pytest.mark.slow)
       for case, name in zip(CASES, IDS)]
    + [pytest.param(*_GPU, case, id=f"{name}-gpu", marks=() if i == 0 else pytest.mark.slow)
       for i, (case, name) in enumerate(zip(CASES, IDS))])


@pytest.mark.parametrize("implementation, blocks, case", FILTER_CASES)
def test_pallas_bilateral_filter_matches_brute_force(rng, case, blocks, implementation):
  b, h, w, l, c, params = case
  _, image = random_inputs(rng, b, h, w, l, c, params)
  q = rng.uniform(0, 1, (b, h, w, l)).astype(np.float32)
  out = crf_api.bilateral_filter(q, image, bi_xy_std=params["bi_xy_std"],
                                          bi_rgb_std=params["bi_rgb_std"],
                                          implementation=implementation, block_sizes=blocks)
  expected = crf_reference.bilateral_filter(q, image, params["bi_xy_std"], params["bi_rgb_std"])
  # Each output sums at most N kernel values times Q <= 1.
  bound = pallas_tolerance(image, params) * h * w
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=max(bound, 1e-5))


@pytest.mark.parametrize("implementation, blocks", [("pallas_tpu", SMALL_TILES),
                                                    ("pallas_gpu", BlockSizes())],
                         ids=["tpu", "gpu"])
def test_pallas_skips_far_tiles_and_stays_exact(rng, implementation, blocks):
  """Two flat colour regions far apart (in colour stds): the key tiles of the other region are
  skipped, and the result is still the brute force's (their kernel values are < 1e-12)."""
  h, w, l = 16, 32, 3
  image = np.zeros((1, h, w, 3), np.float32)
  image[:, :, 16:] = 200.0
  image += rng.uniform(0, 1, image.shape).astype(np.float32)
  q = rng.uniform(0, 1, (1, h, w, l)).astype(np.float32)
  params = dict(bi_xy_std=10.0, bi_rgb_std=3.0)
  # Z-order puts each region's 256 pixels together: half the tile pairs are skipped (the
  # kernels apply the same test to the same boxes).
  kept = crf_api.tile_pairs_kept(image, implementation=implementation, block_sizes=blocks,
                                          **params)
  np.testing.assert_allclose(kept, [0.5])
  out = crf_api.bilateral_filter(q, image, implementation=implementation,
                                          block_sizes=blocks, **params)
  expected = crf_reference.bilateral_filter(q, image, **params)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation, case", [("pallas_tpu", CASES[0]),
                                                  pytest.param("pallas_tpu", CASES[1], marks=pytest.mark.slow),
                                                  ("pallas_gpu", CASES[0])],
                         ids=["tpu-" + IDS[0], "tpu-" + IDS[1], "gpu-" + IDS[0]])
def test_pallas_mean_field_matches_xla_and_brute_force(rng, case, implementation):
  b, h, w, l, c, params = case
  logits, image = random_inputs(rng, b, h, w, l, c, params)
  mu = random_compatibility(rng, l)
  q = kernels.dense_crf(logits, image, iterations=3, compatibility=mu, implementation=implementation,
                        **params)
  xla = kernels.dense_crf(logits, image, iterations=3, compatibility=mu, implementation="xla", **params)
  expected = crf_reference.dense_crf(logits, image, 3, compatibility=mu, **params)
  # A kernel value's error times the weight and the N pixels it sums over, through 3 steps.
  bound = 3 * params["bi_w"] * h * w * pallas_tolerance(image, params)
  np.testing.assert_allclose(q, expected, rtol=1e-4, atol=max(bound, 2e-5))
  np.testing.assert_allclose(q, xla, rtol=1e-4, atol=max(bound, 2e-5))
  np.testing.assert_allclose(np.sum(q, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("implementation", PALLAS)
def test_pallas_gradients_match_xla(rng, implementation):
  b, h, w, l, c, params = CASES[2]
  logits, image = random_inputs(rng, b, h, w, l, c, params)
  mu = random_compatibility(rng, l)
  weights = _loss_weights(rng, (b, h, w, l))
  fixed = {k: v for k, v in params.items() if k not in ("pos_w", "bi_w")}

  def loss(logits, pos_w, bi_w, mu, implementation):
    q = kernels.dense_crf(logits, image, iterations=1, pos_w=pos_w, bi_w=bi_w, compatibility=mu,
                          implementation=implementation, **fixed)
    return jnp.sum(q * weights)

  args = (logits, jnp.float32(params["pos_w"]), jnp.float32(params["bi_w"]), mu)
  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*args, implementation)
  expected = jax.grad(loss, argnums=(0, 1, 2, 3))(*args, "xla")
  for name, got, want in zip(("logits", "pos_w", "bi_w", "compatibility"), grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max() + 1e-6,
                               err_msg=name)


# ------------------------------------------------------------------------------------------
# Lowering for the real backends (as tests/kernels/test_lowering.py does for the other kernels).

@pytest.mark.parametrize("implementation", PALLAS)
@pytest.mark.parametrize("shape", [(2, 321, 321, 21), (1, 7, 9, 3)], ids=["voc", "tiny"])
def test_pallas_lowers_forward_and_backward(implementation, shape):
  logits = jax.ShapeDtypeStruct(shape, jnp.float32)
  image = jax.ShapeDtypeStruct(shape[:3] + (3,), jnp.float32)

  def loss_and_grad(logits, image, bi_w):
    def loss(logits, bi_w):
      return kernels.dense_crf(logits, image, iterations=2, bi_w=bi_w,
                               implementation=implementation).sum()
    return jax.value_and_grad(loss, argnums=(0, 1))(logits, bi_w)

  exported = export(implementation, loss_and_grad, logits, image,
                    jax.ShapeDtypeStruct((), jnp.float32))
  # One filter call in the forward scan's body and one in the backward scan's (the same kernel
  # on the cotangent).
  assert kernel_calls(implementation, exported.mlir_module()) == 2, \
      "expected a forward and a backward kernel"
