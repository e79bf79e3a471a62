"""Training data: the dataset of crops, the epoch sampler, augmentation, batching and norms.

The original toolkit's import paths work unchanged: ``from map2map.data import FieldDataset``.
"""

from .fields import FieldDataset
from .sampler import DistFieldSampler

__all__ = ["DistFieldSampler", "FieldDataset"]
