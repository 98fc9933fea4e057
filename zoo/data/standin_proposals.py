"""Stand-in proposals for Fast R-CNN on data that ships none: jittered ground truth + random boxes.

Fast R-CNN (Girshick 2015) takes its regions from outside the network, Selective Search's
~2,000 boxes per image, precomputed once and stored beside the dataset. The embedded digit
canvases have no such file, so `jittered_proposals` stands in for it: per image a fixed number
P of boxes,

- `copies` jittered copies of each ground-truth box (the boxes a good proposal method finds
  near an object): centre moved by U(-translate, translate) x the box's width / height, width
  and height scaled by exp(U(-scale, scale)) each, clipped to the image;
- the rest uniformly random boxes (the background clutter every proposal method also
  returns): side sqrt(w h) log-uniform in [min_size, max(H, W)], aspect h / w log-uniform in
  [1 / max_aspect, max_aspect], placed uniformly so the box lies inside the image (sides
  capped at the image's).

Slots of padding ground truth get random boxes too, so all P proposals are valid and the
shapes are static. The boxes are a pure function of (key, ground truth): fold the example's id
into a fixed seed (`example_key`) and an example gets the same proposals in every epoch and in
evaluation, as it would from a precomputed file. Generated from the ground truth, they are
better than Selective Search's (every object has `copies` boxes around it): an AP measured
with them says how well the head classifies and refines given regions, not how well a full
detector finds objects.

They reach the model through the data, as a proposal file's would: `split_proposals` computes
every example's boxes ({id: (P, 4)}, from the ground truth padded to `max_objects` slots, as
the pipeline pads it), and `load_data_source(name, split, proposals={...})` with a dict of
`split_proposals`' settings joins them to the source (`zoo.data.proposal_files.ProposalSource`,
keyed by the example's `id`), so batches carry `proposals` and `proposals_valid`.
`python -m experiments.make_proposals` writes the same boxes to files.

    source = load_data_source("digit_canvases", "train",
                              proposals=dict(num_proposals=128, copies=16, seed=0, max_objects=4))
"""

import jax
import jax.numpy as jnp
import numpy as np

from zoo.data import pipeline


def example_key(seed: int, example_id: jax.Array) -> jax.Array:
  """The proposals' key of one example: fold_in(key(seed), id); id (,) int32 (-1 on padding)."""
  return jax.random.fold_in(jax.random.key(seed), example_id.astype(jnp.uint32))


def random_boxes(key, num: int, image_size, *, min_size: float = 4.0, max_aspect: float = 2.0):
  """`num` boxes inside the image (module doc): (num, 4) float32 (x1, y1, x2, y2) pixels."""
  height, width = image_size
  k_size, k_aspect, k_x, k_y = jax.random.split(key, 4)
  side = jnp.exp(jax.random.uniform(k_size, (num,), minval=jnp.log(min_size),
                                    maxval=jnp.log(max(height, width))))
  aspect = jnp.exp(jax.random.uniform(k_aspect, (num,), minval=-jnp.log(max_aspect),
                                      maxval=jnp.log(max_aspect)))
  w = jnp.minimum(side / jnp.sqrt(aspect), width)
  h = jnp.minimum(side * jnp.sqrt(aspect), height)
  x1 = jax.random.uniform(k_x, (num,)) * (width - w)
  y1 = jax.random.uniform(k_y, (num,)) * (height - h)
  return jnp.stack([x1, y1, x1 + w, y1 + h], axis=-1)


def jitter_boxes(key, boxes, copies: int, image_size, *, translate: float = 0.15,
                 scale: float = 0.25):
  """`copies` jittered versions of each box (module doc), clipped to the image.

  Args:
    key: a jax.random key.
    boxes: (G, 4) float (x1, y1, x2, y2) pixels.
    copies: k, static.
    image_size: (H, W).
    translate: the largest centre shift, in box widths (x) and heights (y).
    scale: the largest |log| of the width and height factors.

  Returns:
    (G, k, 4) float32 pixels: copy j of box g at [g, j].
  """
  k_shift, k_scale = jax.random.split(key)
  g = boxes.shape[0]
  w = (boxes[:, 2] - boxes[:, 0])[:, None]
  h = (boxes[:, 3] - boxes[:, 1])[:, None]
  cx = boxes[:, 0][:, None] + 0.5 * w
  cy = boxes[:, 1][:, None] + 0.5 * h
  shift = jax.random.uniform(k_shift, (2, g, copies), minval=-translate, maxval=translate)
  factor = jnp.exp(jax.random.uniform(k_scale, (2, g, copies), minval=-scale, maxval=scale))
  cx, cy = cx + shift[0] * w, cy + shift[1] * h
  w, h = w * factor[0], h * factor[1]
  jittered = jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
  height, width = image_size
  return jnp.clip(jittered, 0.0, jnp.asarray([width, height, width, height], jittered.dtype))


def jittered_proposals(key, gt_boxes, gt_valid, image_size, *, num_proposals: int, copies: int,
                       translate: float = 0.15, scale: float = 0.25, min_size: float = 4.0,
                       max_aspect: float = 2.0):
  """One image's P proposals: k jittered copies per ground-truth box, then random boxes.

  Args:
    key: a jax.random key (`example_key`).
    gt_boxes: (G, 4) float (x1, y1, x2, y2) pixels; gt_valid: (G,) bool (False: padding).
    image_size: (H, W) pixels.
    num_proposals: P (static), at least G x copies.
    copies: k jittered copies per ground-truth box (static).
    translate, scale: `jitter_boxes`'s; min_size, max_aspect: `random_boxes`'.

  Returns:
    (P, 4) float32 pixels, all valid: slots [g k, (g + 1) k) hold the copies of gt box g (random
    boxes where gt g is padding), slots [G k, P) random boxes. vmap over images.
  """
  g = gt_boxes.shape[0]
  if g * copies > num_proposals:
    raise ValueError(f"jittered_proposals: {g} ground-truth slots x {copies} copies = "
                     f"{g * copies} > num_proposals={num_proposals}; raise num_proposals or "
                     f"lower the copies per box (or max_objects).")
  k_jitter, k_random = jax.random.split(key)
  random = random_boxes(k_random, num_proposals, image_size, min_size=min_size,
                        max_aspect=max_aspect)
  jittered = jitter_boxes(k_jitter, gt_boxes.astype(jnp.float32), copies, image_size,
                          translate=translate, scale=scale)
  near = jnp.where(jnp.repeat(gt_valid, copies)[:, None], jittered.reshape(g * copies, 4),
                   random[:g * copies])
  return jnp.concatenate([near, random[g * copies:]])


def split_proposals(source, *, num_proposals: int, copies: int, max_objects: int, seed: int = 0,
                    translate: float = 0.15, scale: float = 0.25, min_size: float = 4.0,
                    batch_size: int = 256) -> dict:
  """{example id: (P, 4) float32 pixels} for every example of `source` (module doc).

  Args:
    source: a random-access source whose examples have an `id` and `objects` (the embedded
      digit canvases).
    num_proposals: P per image.
    copies: jittered copies per ground-truth box.
    max_objects: the ground-truth slots the boxes are generated for, the pipeline's
      max_objects (the random draws depend on it).
    seed: the proposals' seed (`example_key`).
    translate, scale, min_size: `jittered_proposals`'.
    batch_size: examples generated per jitted call.

  Raises:
    ValueError for examples without an `id` (stand-ins are keyed by it).
  """
  if "id" not in source[0]:
    raise ValueError("Stand-in proposals are keyed by the examples' `id`, which this dataset "
                     "lacks; give it a proposal file instead (config.data.proposals=PATH).")
  height, width = np.shape(source[0]["image"])[:2]

  @jax.jit
  def generate(ids, boxes, valid):
    def one(example_id, gt_boxes, gt_valid):
      return jittered_proposals(
          example_key(seed, example_id), gt_boxes, gt_valid, (height, width),
          num_proposals=num_proposals, copies=copies, translate=translate, scale=scale,
          min_size=min_size)
    return jax.vmap(one)(ids, boxes, valid)

  out = {}
  for batch in pipeline.eval_batches(source, global_batch_size=batch_size, max_objects=max_objects,
                                     features=("boxes", "id"), process_index=0, process_count=1):
    boxes = np.asarray(generate(batch["id"], batch["boxes"], batch["objects_valid"]))
    for i in np.flatnonzero(batch["example_valid"]):
      out[int(batch["id"][i])] = boxes[i]
  return out
