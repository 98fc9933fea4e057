"""Data: the embedded `digit_canvases` dataset, TFDS data sources, the grain input pipeline.

    source = zoo.data.load_data_source("digit_canvases", "train")   # prepared on first use
    batches = zoo.data.pipeline.train_batches(source, global_batch_size=32, seed=0,
                                              features=("image", "segmentation"))

`load_data_source` returns a TFDS random-access data source for any TFDS name; the
embedded dataset (`zoo/data/digit_canvases.py`) needs no download and is written into the
TFDS data dir the first time it is asked for. Real datasets (COCO, VOC, ...) are prepared
by the user with TFDS as usual.
"""

from zoo.data.labels import CLASS_NAMES, IGNORE_LABEL, NUM_SEGMENTATION_CLASSES
from zoo.data.sources import EMBEDDED_DATASETS, load_data_source

__all__ = ["CLASS_NAMES", "EMBEDDED_DATASETS", "IGNORE_LABEL", "NUM_SEGMENTATION_CLASSES",
           "load_data_source"]
