"""Qilin-Med-VL: the CLIP vision tower, the adapter and the LLaMA language model as one model."""

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id in input_ids: one per image, expanded to its patch features
IGNORE_INDEX = -100  # label value that cross-entropy skips
