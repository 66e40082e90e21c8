"""Patch sampling that also reaches the unlabeled voxels.

With an ignore label, nnU-Net centres every patch that is not foreground-oversampled on an *annotated* voxel
(``class_locations[annotated_classes_key]``), so regions far from the annotated slices are never seen. The
wrapper below replaces those locations by one uniformly drawn voxel for a fraction of the loads: the data
loader then centres that patch on a uniformly random voxel, while foreground oversampling, which uses the
class keys, is untouched.
"""

import numpy as np


def load_probability(uniform_fraction: float, batch_size: int, oversample_foreground_percent: float) -> float:
    """Per-load probability that makes ``uniform_fraction`` of all patches uniform.

    nnU-Net oversamples foreground for the last ``B - round(B * (1 - oversample))`` samples of a batch; only the
    other samples look at the annotated locations, so the probability is scaled up by their share (capped at 1).
    """
    if not 0.0 <= uniform_fraction <= 1.0:
        raise ValueError(f"uniform_fraction must be in [0, 1], got {uniform_fraction}")
    not_oversampled = round(batch_size * (1 - oversample_foreground_percent)) / batch_size
    if not_oversampled == 0:
        return 0.0
    return min(1.0, uniform_fraction / not_oversampled)


class UniformPatchMixDataset:
    """Wraps an nnU-Net dataset (``identifiers``, ``load_case``) for the training data loader.

    Args:
        dataset: an nnUNetBaseDataset instance.
        annotated_key: the data loader's ``annotated_classes_key`` (``(-1, *all_labels)``).
        probability: chance per loaded case that the annotated locations become one uniform random voxel.
    """

    def __init__(self, dataset, annotated_key: tuple, probability: float):
        self.dataset = dataset
        self.identifiers = dataset.identifiers
        self.annotated_key = annotated_key
        self.probability = probability

    def __len__(self) -> int:
        return len(self.identifiers)

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        # nnU-Net's loaders draw with the global numpy RNG (seeded per worker); follow it.
        if self.probability > 0 and np.random.uniform() < self.probability:
            voxel = [0] + [np.random.randint(n) for n in data.shape[1:]]  # (channel, *spatial) like nnU-Net's
            locations = dict(properties["class_locations"])
            locations[self.annotated_key] = np.array([voxel])
            properties = {**properties, "class_locations": locations}
        return data, seg, seg_prev, properties
