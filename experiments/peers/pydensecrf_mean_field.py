"""bench_crf's peer: Krähenbühl's dense-CRF mean field (pydensecrf / pydensecrf2, C++).

spec: inputs (.npz: image (H, W, 3) uint8, logits (H, W, L) float32), outputs (.npz path the
report writes Q (H, W, L) float32 to), iterations, params (pos_w, pos_xy_std, bi_w, bi_xy_std,
bi_rgb_std: bench_crf's PARAMS). One row, "forward", one call per window, on one CPU core.
It is APPROXIMATE (a permutohedral lattice, which also blurs each pixel with itself), run with
NO_NORMALIZATION and Potts compatibilities, the semantics closest to kernels.dense_crf's.
"""

from experiments import benchmarking


def prepare(spec: dict) -> benchmarking.Prepared:
  import numpy as np
  import pydensecrf.densecrf as dcrf  # pydensecrf and pydensecrf2 both install this name

  arrays = np.load(spec["inputs"])
  image, logits, params = arrays["image"], arrays["logits"], spec["params"]
  h, w, l = logits.shape

  def mean_field():
    crf = dcrf.DenseCRF2D(w, h, l)
    crf.setUnaryEnergy(np.ascontiguousarray(-logits.reshape(-1, l).T, np.float32))
    # PottsCompatibility(w) adds +w * filtered Q of the same label, which (rows of Q summing
    # to 1) is our Potts energy up to a per-pixel constant; NO_NORMALIZATION = our
    # unnormalised kernels.
    crf.addPairwiseGaussian(sxy=params["pos_xy_std"], compat=params["pos_w"],
                            kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NO_NORMALIZATION)
    crf.addPairwiseBilateral(sxy=params["bi_xy_std"], srgb=params["bi_rgb_std"],
                             rgbim=np.ascontiguousarray(image), compat=params["bi_w"],
                             kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NO_NORMALIZATION)
    return np.array(crf.inference(spec["iterations"]), np.float32).T.reshape(h, w, l)

  rows = {"forward": benchmarking.Timed(mean_field, calls=1)}

  def report():
    np.savez(spec["outputs"], q=rows["forward"].result)
    return {}

  return benchmarking.Prepared(rows=rows, info={"versions": "pydensecrf, one CPU core"},
                               report=report)


if __name__ == "__main__":
  benchmarking.serve(prepare, imports=("pydensecrf.densecrf", "numpy"))
