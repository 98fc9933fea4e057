"""bench_roi's peer: torchvision.ops.roi_align / roi_pool on the harness's arrays.

spec: op ("roi_align" | "roi_pool"), dtype ("float32" | "bfloat16"), output_size, spatial_scale,
sampling_ratio, min_window_s, threads, inputs (.npz: features (N, H, W, C), boxes (K, 4) x1 y1 x2
y2, box_indices (K,), cotangent (K, oh, ow, C), float32), outputs (.npz path the report writes).
Rows "fwd" (the op alone, no autograd) and "fwd+bwd" (the op and the gradient of
sum(out * cotangent) with respect to the features). NCHW inputs, rois (K, 5) = [batch index,
x1, y1, x2, y2] in the features' dtype (torchvision requires it; bfloat16 rounds the boxes),
aligned=True; on CUDA when torch sees a GPU (synchronised per window), else on the CPU with
torch.set_num_threads(threads). The report writes the latest output and gradient as NHWC
float32 and says whether the first and the latest gradient are bit-equal (torchvision's CUDA
backward scatters with atomicAdd).
"""

from experiments import benchmarking


def prepare(spec: dict) -> benchmarking.Prepared:
  import numpy as np
  import torch
  import torchvision

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(spec["threads"])
  dtype = getattr(torch, spec["dtype"])
  arrays = np.load(spec["inputs"])
  nchw = lambda name: torch.from_numpy(arrays[name].transpose(0, 3, 1, 2).copy()).to(
      device, dtype).contiguous()
  features, cotangent = nchw("features"), nchw("cotangent")
  rois = torch.from_numpy(np.concatenate(
      [arrays["box_indices"][:, None].astype(np.float32), arrays["boxes"]], 1)).to(device, dtype)
  size, scale = spec["output_size"], spec["spatial_scale"]
  if spec["op"] == "roi_align":
    call = lambda x: torchvision.ops.roi_align(x, rois, size, scale, spec["sampling_ratio"], True)
  else:
    call = lambda x: torchvision.ops.roi_pool(x, rois, size, scale)
  leaf = features.detach().requires_grad_(True)

  def forward():
    with torch.no_grad():
      return call(features)

  def fwd_bwd():
    out = call(leaf)
    (grad,) = torch.autograd.grad(out, leaf, cotangent)
    return out.detach(), grad

  def sync(result):
    if device == "cuda":
      torch.cuda.synchronize()
    return result

  window = spec["min_window_s"]
  rows = {"fwd": benchmarking.Timed(forward, sync, min_window_s=window),
          "fwd+bwd": benchmarking.Timed(fwd_bwd, sync, min_window_s=window)}

  def report():
    first, last = rows["fwd+bwd"].first, rows["fwd+bwd"].result
    nhwc = lambda t: t.float().cpu().numpy().transpose(0, 2, 3, 1)
    np.savez(spec["outputs"], out=nhwc(last[0]), grad=nhwc(last[1]))
    return {"bit_equal": bool(torch.equal(first[1], last[1]))}

  versions = f"torch {torch.__version__}, torchvision {torchvision.__version__} on " + (
      torch.cuda.get_device_name() if device == "cuda"
      else f"the CPU, {torch.get_num_threads()} threads")
  return benchmarking.Prepared(rows=rows, info={"name": f"torchvision-{device}",
                                                "versions": versions}, report=report)


if __name__ == "__main__":
  benchmarking.serve(prepare, imports=("torch", "torchvision", "numpy"))
