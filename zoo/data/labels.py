"""Label conventions of the embedded data and of every segmentation source."""

# Semantic segmentation of the digit canvases: class 0 is the background, digit d is d + 1.
CLASS_NAMES = ("background",) + tuple(str(d) for d in range(10))
NUM_SEGMENTATION_CLASSES = len(CLASS_NAMES)  # 11
# `segmentation` value of pixels that count for nothing (the padded rows of an eval batch).
IGNORE_LABEL = 255
