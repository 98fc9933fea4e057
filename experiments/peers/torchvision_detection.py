"""bench_detection's peer: torchvision's Faster / Mask R-CNN R50-FPN, inference and training.

spec: model ("faster_rcnn_r50_fpn" | "mask_rcnn_r50_fpn"), batch_size, height, width,
num_objects, threads. torchvision's fasterrcnn_resnet50_fpn / maskrcnn_resnet50_fpn
(weights=None, 91 classes) with its transform's min_size / max_size set to the images' size,
random images and random ground truth (boxes 16-256 px, labels 1-90, box-filled masks). Rows,
one call per window: "<precision> inference" (eval mode, no_grad) and "<precision> train"
(train mode, the summed losses, backward, SGD lr 1e-4), precision "fp32", and on CUDA also
"amp" (bfloat16 autocast); synchronised per call on CUDA, torch.set_num_threads(threads) on
a CPU.
"""

from experiments import benchmarking


def prepare(spec: dict) -> benchmarking.Prepared:
  import contextlib

  import torch
  from torchvision.models import detection

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  if not cuda:
    torch.set_num_threads(spec["threads"])
  name, batch, height, width = spec["model"], spec["batch_size"], spec["height"], spec["width"]
  build = {"faster_rcnn_r50_fpn": detection.fasterrcnn_resnet50_fpn,
           "mask_rcnn_r50_fpn": detection.maskrcnn_resnet50_fpn}[name]
  model = build(weights=None, weights_backbone=None, min_size=height,
                max_size=max(height, width)).to(device)
  generator = torch.Generator().manual_seed(0)
  images = [torch.rand(3, height, width, generator=generator).to(device) for _ in range(batch)]
  targets, count = [], spec["num_objects"]
  for _ in range(batch):
    xy = torch.rand(count, 2, generator=generator) * torch.tensor([width - 64, height - 64])
    wh = 16 + torch.rand(count, 2, generator=generator) * 240
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([width, height]))], 1)
    target = {"boxes": boxes.to(device),
              "labels": torch.randint(1, 91, (count,), generator=generator).to(device)}
    if name.startswith("mask"):
      masks = torch.zeros(count, height, width, dtype=torch.uint8)
      for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[k, y1:y2, x1:x2] = 1
      target["masks"] = masks.to(device)
    targets.append(target)
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
  sync = (lambda result: torch.cuda.synchronize()) if cuda else (lambda result: result)

  def rows_for(amp: bool):
    precision = lambda: (torch.autocast("cuda", dtype=torch.bfloat16) if amp
                         else contextlib.nullcontext())

    def inference():
      model.eval()
      with torch.no_grad(), precision():
        return model(images)

    def train():
      model.train()
      with precision():
        losses = model(images, targets)
      optimizer.zero_grad()
      sum(losses.values()).backward()
      optimizer.step()

    prefix = "amp" if amp else "fp32"
    return {f"{prefix} inference": benchmarking.Timed(inference, sync, calls=1),
            f"{prefix} train": benchmarking.Timed(train, sync, calls=1)}

  rows = {**rows_for(False), **(rows_for(True) if cuda else {})}
  return benchmarking.Prepared(rows=rows, info={
      "versions": f"torch {torch.__version__} on " + (
          torch.cuda.get_device_name() if cuda else f"the CPU, {torch.get_num_threads()} threads")})


if __name__ == "__main__":
  benchmarking.serve(prepare, imports=("torch", "torchvision"))
