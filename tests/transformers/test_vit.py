"""ViT: parameter counts, vit_jax's parameter names, output and aux shapes, the whole forward pass
against a float64 NumPy transcription of google-research/vision_transformer's models_vit.py, the
position-embedding resize against scipy directly, and clear errors for bad image sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from flax.traverse_util import flatten_dict

import zoo
from zoo.transformers.vit import VisionTransformer, resize_position_embeddings


def _abstract_init(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _num_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _random_params(model, shape, rng):
  """Fresh random parameters of `model` for images of `shape`, without compiling `init`:
  non-trivial LayerNorm scales, biases, class token and head (vit_jax zero-initialises the last
  two, which would hide them)."""

  def sample(path, a):
    name = path[-1].key
    if name == "scale":
      value = 1 + 0.1 * rng.standard_normal(a.shape)
    elif name == "kernel":  # (D, H, d_h) for query/key/value: fan-in D
      fan_in = a.shape[0] if path[-2].key in ("query", "key", "value") else np.prod(a.shape[:-1])
      value = rng.standard_normal(a.shape) / np.sqrt(fan_in)
    else:
      value = 0.3 * rng.standard_normal(a.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(sample, _abstract_init(model, shape)["params"])


# --- A float64 NumPy transcription of vit_jax/models_vit.py (flax semantics spelled out). ---

def _layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu_tanh(x):  # flax nn.gelu's default (approximate=True), which vit_jax uses
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _attention(x, p):
  """flax MultiHeadDotProductAttention(x, x): per-head projections (D, H, d_h), the query scaled
  by 1/sqrt(d_h), softmax over keys, output projection (H, d_h, D)."""
  q, k, v = (np.einsum("btd,dhk->bthk", x, p[n]["kernel"]) + p[n]["bias"]
             for n in ("query", "key", "value"))
  logits = np.einsum("bqhk,bshk->bhqs", q / np.sqrt(q.shape[-1]), k)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqs,bshk->bqhk", weights, v)
  return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def _vit_reference(params, images, *, patch, classifier, representation_size, num_classes):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(images, np.float64)
  b, h, w, c = x.shape
  gh, gw = h // patch, w // patch
  # Patch embedding: non-overlapping PxP patches (row-major grid), each flattened in (y, x, c)
  # order, times the conv kernel (P, P, C, D) flattened the same way.
  patches = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  kernel = p["embedding"]["kernel"]
  x = patches.reshape(b, gh * gw, -1) @ kernel.reshape(-1, kernel.shape[-1]) + p["embedding"]["bias"]
  if classifier == "token":
    x = np.concatenate([np.repeat(p["cls"], b, axis=0), x], axis=1)
  t = p["Transformer"]
  x = x + t["posembed_input"]["pos_embedding"]
  layer = 0
  while f"encoderblock_{layer}" in t:
    blk = t[f"encoderblock_{layer}"]
    x = x + _attention(_layer_norm(x, blk["LayerNorm_0"]), blk["MultiHeadDotProductAttention_1"])
    mlp = blk["MlpBlock_3"]
    y = _layer_norm(x, blk["LayerNorm_2"])
    y = _gelu_tanh(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
    x = x + y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
    layer += 1
  tokens = _layer_norm(x, t["encoder_norm"])
  y = tokens[:, 0] if classifier == "token" else tokens.mean(1)
  if representation_size is not None:
    y = np.tanh(y @ p["pre_logits"]["kernel"] + p["pre_logits"]["bias"])
  if num_classes:
    y = y @ p["head"]["kernel"] + p["head"]["bias"]
  return y, tokens


# --- Tests. ---

def test_parameter_counts_and_vit_jax_names():
  """ViT-B/16 at 224 with 1000 classes: 86,567,656 parameters, and ViT-L/16 304,326,632 (both
  as torchvision's ViT_B_16_Weights / ViT_L_16_Weights `num_params`, the same architecture: a
  class token, 197 position embeddings, no pre-logits layer; timm quotes 86.6M / 304.3M).
  By hand: patch conv P^2 C D + D, cls D, posemb 197 D, per block 2 LayerNorms 4D, attention
  4 (D^2 + D), MLP 2 D M + M + D, then encoder_norm 2D and head D K + K."""
  for name, d, layers, mlp, expected in (("vit_b16", 768, 12, 3072, 86_567_656),
                                         ("vit_l16", 1024, 24, 4096, 304_326_632)):
    by_hand = (16 * 16 * 3 * d + d + d + 197 * d
               + layers * (4 * d + 4 * (d * d + d) + 2 * d * mlp + mlp + d)
               + 2 * d + d * 1000 + 1000)
    assert by_hand == expected
    params = _abstract_init(zoo.create(name), (1, 224, 224, 3))["params"]
    assert _num_params(params) == expected
  names = {"/".join(k): v.shape for k, v in flatten_dict(params).items()}
  # A sample of vit_jax's checkpoint names (npz keys) and shapes, for ViT-L/16.
  assert names["embedding/kernel"] == (16, 16, 3, 1024)
  assert names["cls"] == (1, 1, 1024)
  assert names["Transformer/posembed_input/pos_embedding"] == (1, 197, 1024)
  block = "Transformer/encoderblock_23/"
  assert names[block + "LayerNorm_0/scale"] == (1024,)
  assert names[block + "MultiHeadDotProductAttention_1/query/kernel"] == (1024, 16, 64)
  assert names[block + "MultiHeadDotProductAttention_1/out/kernel"] == (16, 64, 1024)
  assert names[block + "LayerNorm_2/bias"] == (1024,)
  assert names[block + "MlpBlock_3/Dense_0/kernel"] == (1024, 4096)
  assert names[block + "MlpBlock_3/Dense_1/bias"] == (1024,)
  assert names["Transformer/encoder_norm/scale"] == (1024,)
  assert names["head/kernel"] == (1024, 1000)
  # The other registered sizes.
  for name, d, heads, mlp in (("vit_ti16", 192, 3, 768), ("vit_s16", 384, 6, 1536)):
    model = zoo.create(name, num_classes=10)
    assert (model.hidden_size, model.num_layers, model.num_heads, model.mlp_dim) == (d, 12, heads, mlp)
  assert zoo.hyperparameters("vit") == [
      "num_classes", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
      "classifier", "representation_size", "dropout_rate", "attention_dropout_rate", "dtype",
      "param_dtype"]


@pytest.mark.parametrize("classifier, representation_size, num_classes",
                         [("token", None, 7), ("gap", 12, 7), ("token", 12, 0)])
def test_output_and_aux_shapes(classifier, representation_size, num_classes):
  model = zoo.create("vit", num_classes=num_classes, patch_size=(4, 2), hidden_size=16,
                     num_layers=2, num_heads=2, mlp_dim=32, classifier=classifier,
                     representation_size=representation_size, dtype="bfloat16")
  images = jnp.zeros((3, 12, 10, 3))
  variables = _abstract_init(model, images.shape)
  prefix = int(classifier == "token")
  assert variables["params"]["Transformer"]["posembed_input"]["pos_embedding"].shape == (
      1, 15 + prefix, 16)
  assert ("cls" in variables["params"]) == (classifier == "token")
  assert ("pre_logits" in variables["params"]) == (representation_size is not None)
  logits, aux = jax.eval_shape(lambda v: model.apply(v, images, train=False), variables)
  assert logits.shape == (3, num_classes or representation_size or 16)
  assert logits.dtype == jnp.float32
  assert aux["tokens"].shape == (3, 15 + prefix, 16) and aux["tokens"].dtype == jnp.bfloat16
  assert aux["feature_map"].shape == (3, 3, 5, 16)


@pytest.mark.parametrize("classifier, representation_size", [("token", None), ("gap", 10)])
def test_forward_matches_float64_transcription(classifier, representation_size):
  rng = np.random.default_rng()
  model = VisionTransformer(num_classes=5, patch_size=4, hidden_size=12, num_layers=2,
                            num_heads=3, mlp_dim=20, classifier=classifier,
                            representation_size=representation_size)
  shape = (2, 8, 12, 3)
  params = _random_params(model, shape, rng)
  images = rng.standard_normal(shape).astype(np.float32)
  logits, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, images)
  expected, tokens = _vit_reference(params, images, patch=4, classifier=classifier,
                                    representation_size=representation_size, num_classes=5)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(aux["tokens"], tokens, rtol=1e-5, atol=1e-5 * np.abs(tokens).max())
  prefix = int(classifier == "token")
  np.testing.assert_array_equal(aux["feature_map"], np.asarray(aux["tokens"])[:, prefix:].reshape(
      2, 2, 3, 12))


def test_resize_position_embeddings_matches_scipy_zoom():
  rng = np.random.default_rng()
  posemb = rng.standard_normal((1, 1 + 7 * 7, 6)).astype(np.float32)
  resized = resize_position_embeddings(posemb, (10, 12))
  assert resized.shape == (1, 1 + 120, 6) and resized.dtype == np.float32
  np.testing.assert_array_equal(resized[:, :1], posemb[:, :1])  # the class token is kept
  direct = scipy.ndimage.zoom(posemb[0, 1:].reshape(7, 7, 6), (10 / 7, 12 / 7, 1), order=1)
  np.testing.assert_array_equal(resized[0, 1:], direct.reshape(120, 6))
  # Without a class token (classifier="gap"); same grid = unchanged.
  gap = resize_position_embeddings(posemb[:, 1:], (14, 14), class_token=False)
  direct = scipy.ndimage.zoom(posemb[0, 1:].reshape(7, 7, 6), (2, 2, 1), order=1)
  np.testing.assert_array_equal(gap[0], direct.reshape(196, 6))
  np.testing.assert_array_equal(resize_position_embeddings(posemb, (7, 7)), posemb)
  with pytest.raises(ValueError, match="not a square grid; pass old_grid"):
    resize_position_embeddings(posemb[:, 2:], (4, 4))

  # A model made for 28x28 runs at 40x48 with the resized embeddings.
  model = zoo.create("vit", num_classes=3, patch_size=4, hidden_size=6, num_layers=1,
                     num_heads=2, mlp_dim=8)
  params = _random_params(model, (1, 28, 28, 3), rng)
  params["Transformer"]["posembed_input"]["pos_embedding"] = resized
  logits, aux = jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 40, 48, 3)),
                                                     train=False), params)
  assert logits.shape == (1, 3) and aux["feature_map"].shape == (1, 10, 12, 6)


def test_bad_image_sizes_raise_clear_errors():
  model = zoo.create("vit", num_classes=3, patch_size=4, hidden_size=6, num_layers=1,
                     num_heads=2, mlp_dim=8)
  variables = _abstract_init(model, (1, 16, 16, 3))
  apply = lambda shape: jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False),
                                       variables)
  with pytest.raises(ValueError, match=r"4x4 patches cannot take 18x16 images: .*multiples of the "
                                       r"patch size \(e.g. 16x16.*resize_position_embeddings"):
    apply((1, 18, 16, 3))
  with pytest.raises(ValueError, match=r"position embeddings have shape \(1, 17, 6\), but this "
                                       r"input gives a sequence of shape \(1, 21, 6\).*"
                                       r"resize_position_embeddings\(posemb"):
    apply((1, 16, 20, 3))
  with pytest.raises(ValueError, match=r"shape \(16, 16, 3\) of rank 3"):
    apply((16, 16, 3))
  with pytest.raises(ValueError, match="classifier must be one of"):
    VisionTransformer(num_classes=3, classifier="unpooled")
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    zoo.create("vit", hidden_size=10, num_heads=3)


@pytest.mark.parametrize("image_size", [(12, 12), (16, 20)])  # the checkpoint's grid; a resized one
def test_vit_jax_checkpoint_loads_and_reproduces_the_reference(image_size, tmp_path):
  """A vit_jax-style .npz ('/'-joined names, as vit_jax's checkpoint.save writes them) of random
  weights for 12x12 images (a square 3x3 grid, as released checkpoints have); loaded at the same or another size it gives the logits of the float64
  transcription of vit_jax's forward (with the position embeddings resized by scipy directly)."""
  rng = np.random.default_rng()
  hyper = dict(patch_size=4, hidden_size=12, mlp_dim=20, num_heads=3, num_layers=2, num_classes=5,
               classifier="token", representation_size=None)
  source = VisionTransformer(**hyper)
  params = _random_params(source, (1, 12, 12, 3), rng)
  flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
  np.savez(tmp_path / "vit.npz", **flat)
  model, variables = zoo.load_checkpoint(tmp_path / "vit.npz", format="vit_jax",
                                         image_size=image_size, **hyper)
  images = rng.standard_normal((2, *image_size, 3)).astype(np.float32)
  logits, _ = model.apply(variables, images, train=False)
  posemb = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
  grid = posemb[0, 1:].reshape(3, 3, -1)
  zoomed = scipy.ndimage.zoom(grid, (image_size[0] / 12, image_size[1] / 12, 1), order=1)
  params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  params64["Transformer"]["posembed_input"]["pos_embedding"] = np.concatenate(
      [posemb[:, :1], zoomed.reshape(1, -1, posemb.shape[-1])], 1).astype(np.float64)
  expected, _ = _vit_reference(params64, images, patch=4, classifier="token",
                               representation_size=None, num_classes=5)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  with pytest.raises(ValueError, match="head/kernel: checkpoint \\(12, 5\\) vs model \\(12, 7\\)"):
    zoo.load_checkpoint(flat, format="vit_jax", image_size=(12, 12), **{**hyper, "num_classes": 7})
