"""bench_swin's peer: a timm model's training step (Swin-T or ViT-B/16), images per second.

spec: model (timm's name, e.g. "swin_tiny_patch4_window7_224"), batch_size, image_size, steps
(per window), warmup (steps), seed, threads. The model has 1000 classes and drop_path_rate 0;
a step is forward, mean cross-entropy, backward and torch.optim.AdamW (lr 1e-3, weight decay
0.05) on random images and labels. Rows, by mode: on CUDA "eager, bf16 autocast" and
"torch.compile, bf16 autocast" (synchronised per window); on a CPU "eager, float32" with
torch.set_num_threads(threads).
"""

from experiments import benchmarking


def prepare(spec: dict) -> benchmarking.Prepared:
  import timm
  import torch

  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  if not cuda:
    torch.set_num_threads(spec["threads"])
  torch.manual_seed(spec["seed"])
  batch, size = spec["batch_size"], spec["image_size"]
  images = torch.randn(batch, 3, size, size, device=device)
  labels = torch.randint(0, 1000, (batch,), device=device)
  sync = (lambda result: torch.cuda.synchronize()) if cuda else (lambda result: result)

  def training_step(compiled: bool):
    model = timm.create_model(spec["model"], num_classes=1000, drop_path_rate=0.0,
                              img_size=size).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    forward = torch.compile(model) if compiled else model

    def step():
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        loss = torch.nn.functional.cross_entropy(forward(images), labels)
      loss.backward()
      optimizer.step()
      return loss

    # torch.compile compiles over the first few calls.
    return benchmarking.Timed(step, sync, calls=spec["steps"],
                              warmup=max(spec["warmup"], 3 if compiled else 1))

  if cuda:
    rows = {"eager, bf16 autocast": training_step(False),
            "torch.compile, bf16 autocast": training_step(True)}
  else:
    rows = {"eager, float32": training_step(False)}
  versions = f"torch {torch.__version__}, timm {timm.__version__} on " + (
      torch.cuda.get_device_name() if cuda else f"the CPU, {torch.get_num_threads()} threads")
  return benchmarking.Prepared(rows=rows, info={"versions": versions})


if __name__ == "__main__":
  benchmarking.serve(prepare, imports=("torch", "timm"))
