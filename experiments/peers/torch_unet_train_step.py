"""bench_train's peer: the same U-Net training step in PyTorch (NCHW, float32).

spec: batch_size, image_size, base_width, depth, padding ("SAME" | "VALID"), norm ("none" |
"batch"), upsample ("transpose" | "bilinear"), num_classes, learning_rate, grad_clip_norm
(0 = none), steps (per window), warmup (steps), threads. One row, "torch": forward, mean
cross-entropy over the pixels, backward, gradient clipping by global norm, Adam; random
images and labels; torch.set_num_threads(threads).
"""

from experiments import benchmarking


def prepare(spec: dict) -> benchmarking.Prepared:
  import torch

  tnn, F = torch.nn, torch.nn.functional
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  pad = 1 if spec["padding"] == "SAME" else 0
  batch_norm = spec["norm"] == "batch"

  def double_conv(c_in, c_out):
    layers = []
    for c in (c_in, c_out):
      layers += [tnn.Conv2d(c, c_out, 3, padding=pad, bias=not batch_norm)]
      layers += [tnn.BatchNorm2d(c_out)] if batch_norm else []
      layers += [tnn.ReLU()]
    return tnn.Sequential(*layers)

  class UNet(tnn.Module):

    def __init__(self):
      super().__init__()
      widths = [spec["base_width"] * 2**level for level in range(spec["depth"] + 1)]
      self.encoder = tnn.ModuleList(
          double_conv(c_in, c_out) for c_in, c_out in zip([3] + widths[:-2], widths[:-1]))
      self.bottleneck = double_conv(widths[-2], widths[-1])
      self.up, self.decoder = tnn.ModuleList(), tnn.ModuleList()
      for level in reversed(range(spec["depth"])):
        if spec["upsample"] == "transpose":
          self.up.append(tnn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2))
        else:
          self.up.append(tnn.Sequential(tnn.Upsample(scale_factor=2, mode="bilinear"),
                                        tnn.Conv2d(widths[level + 1], widths[level], 1)))
        self.decoder.append(double_conv(2 * widths[level], widths[level]))
      self.head = tnn.Conv2d(widths[0], spec["num_classes"], 1)

    def forward(self, x):
      skips = []
      for stage in self.encoder:
        x = stage(x)
        skips.append(x)
        x = F.max_pool2d(x, 2)
      x = self.bottleneck(x)
      for up, stage in zip(self.up, self.decoder):
        x = up(x)
        skip = skips.pop()
        top, left = (skip.shape[2] - x.shape[2]) // 2, (skip.shape[3] - x.shape[3]) // 2
        skip = skip[:, :, top:top + x.shape[2], left:left + x.shape[3]]
        x = stage(torch.cat([skip, x], 1))
      return self.head(x)

  model = UNet()
  optimizer = torch.optim.Adam(model.parameters(), spec["learning_rate"])
  size = spec["image_size"]
  images = torch.randn(spec["batch_size"], 3, size, size)
  out_size = model(images[:1]).shape[2]
  labels = torch.randint(0, spec["num_classes"], (spec["batch_size"], out_size, out_size))

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    if spec["grad_clip_norm"]:
      tnn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip_norm"])
    optimizer.step()
    return loss

  parameters = sum(p.numel() for p in model.parameters())
  return benchmarking.Prepared(
      rows={"torch": benchmarking.Timed(step, calls=spec["steps"], warmup=spec["warmup"])},
      info={"versions": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
            "parameters": parameters})


if __name__ == "__main__":
  benchmarking.serve(prepare, imports=("torch",))
