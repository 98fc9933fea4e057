r"""Writes the embedded data's stand-in proposals to files, one per split, for Fast R-CNN.

    python -m experiments.make_proposals --output=runs/proposals/digit_canvases_{split}.npz
    python -m experiments.train --config=experiments/configs/fast_rcnn.py:file \
        --config.data.proposals=runs/proposals/digit_canvases_{split}.npz --workdir=runs/fast_rcnn_file

The boxes are `zoo.data.standin_proposals.jittered_proposals` of each example (k jittered copies
of every ground-truth box + random boxes, keyed by fold_in(key(seed), id)): exactly the ones
`--config.data.proposals` as a dict of the same settings joins to the data, now in a file
(`zoo.data.proposal_files`' .npz, keyed by the example id) that the data pipeline joins to
the examples like a Selective Search file for VOC.
"""

import os

from absl import app, flags

from zoo.data import load_data_source, proposal_files
from zoo.data.standin_proposals import split_proposals

DATASET = flags.DEFINE_string("dataset", "digit_canvases", "A dataset with boxes and ids.")
DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir.")
SPLITS = flags.DEFINE_list("splits", ["train", "validation", "test"], "Splits to write.")
OUTPUT = flags.DEFINE_string("output", "runs/proposals/digit_canvases_{split}.npz",
                             "Output path; {split} is replaced by the split.")
NUM_PROPOSALS = flags.DEFINE_integer("num_proposals", 128, "Proposals per image (P).")
COPIES = flags.DEFINE_integer("copies", 16, "Jittered copies per ground-truth box.")
SEED = flags.DEFINE_integer("seed", 0, "The proposals' seed (config.data.proposals.seed).")
MAX_OBJECTS = flags.DEFINE_integer("max_objects", 4, "Object slots per image (the config's).")


def main(argv):
  del argv
  for split in SPLITS.value:
    path = OUTPUT.value.replace("{split}", split)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    boxes = split_proposals(load_data_source(DATASET.value, split, data_dir=DATA_DIR.value),
                            num_proposals=NUM_PROPOSALS.value, copies=COPIES.value,
                            seed=SEED.value, max_objects=MAX_OBJECTS.value)
    proposal_files.save_proposals(path, boxes)
    print(f"{split}: {len(boxes)} images x {NUM_PROPOSALS.value} proposals -> {path}")


if __name__ == "__main__":
  app.run(main)
