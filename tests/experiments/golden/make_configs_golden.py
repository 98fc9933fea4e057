"""Writes configs_before_composable.json: every config file's every variant, resolved.

    python tests/experiments/golden/make_configs_golden.py

It was run once, at commit 5718333, before experiments/configs became composable (issue 11,
item 5: common.py, comma-separated variant arguments, tied values), on the variant names that
existed then. tests/experiments/test_composable_configs.py compares today's configs with it, so
that the rewrite kept every resolved value. Do not rerun it to make that test pass: it records
what the configs were.

The file maps config module -> variant -> `ConfigDict.to_dict()` (FieldReferences resolved;
tuples become JSON lists).
"""

import json
import os

from experiments.configs import deeplab, fast_rcnn, fcn, mask_rcnn, swin, unet, vit

VARIANTS = {
    unet: ("", "paper", "smoke"),
    swin: ("", "smoke", "segmentation", "segmentation_smoke"),
    vit: ("", "smoke"),
    fcn: ("", "fcn32s", "fcn16s", "smoke", "voc", "pet"),
    deeplab: ("", "postprocess", "crf_trainable", "largefov", "v2", "smoke", "voc", "pet"),
    mask_rcnn: ("", "faster", "smoke", "voc", "coco", "coco_boxes"),
    fast_rcnn: ("", "spp", "roi_align", "file", "voc", "faster", "smoke"),
}


def main():
  resolved = {module.__name__.rsplit(".", 1)[-1]: {v: module.get_config(v).to_dict()
                                                    for v in variants}
              for module, variants in VARIANTS.items()}
  path = os.path.join(os.path.dirname(__file__), "configs_before_composable.json")
  with open(path, "w") as f:
    json.dump(resolved, f, indent=1, sort_keys=True)
    f.write("\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
