"""Patch sampling that also reaches the unlabeled voxels.

With an ignore label, nnU-Net centres every patch that is not foreground-oversampled on an *annotated* voxel
(``class_locations[annotated_classes_key]``), so regions far from the annotated slices are never seen. The
wrapper below replaces those locations by one uniformly drawn voxel for a fraction of the loads: the data
loader then centres that patch on a uniformly random voxel, while foreground oversampling, which uses the
class keys, is untouched. ``AddedRandomPatchesDataset`` instead *adds* such patches in front of nnU-Net's own
batch, so that the rest of the batch is sampled exactly as stock nnU-Net samples it.
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


def with_added_patches(batch_size: int, oversample_foreground_percent: float, added: int) -> tuple[int, float]:
    """Batch size and oversampling share for nnU-Net's loader when ``added`` patches precede a batch of
    ``batch_size``: the loader oversamples foreground for the last ``round(B' * (1 - p'))`` samples on, which must
    be exactly the ones it oversamples in the original batch, shifted by ``added``."""
    if added < 0:
        raise ValueError(f"added must be >= 0, got {added}")
    if added == 0:
        return batch_size, oversample_foreground_percent
    total = batch_size + added
    not_oversampled = added + round(batch_size * (1 - oversample_foreground_percent))
    return total, 1 - not_oversampled / total


def with_random_centre(data, properties: dict, annotated_key: tuple) -> dict:
    """``properties`` whose annotated locations are one uniformly drawn voxel of ``data`` (a new dict)."""
    # nnU-Net's loaders draw with the global numpy RNG (seeded per worker); follow it.
    voxel = [0] + [np.random.randint(n) for n in data.shape[1:]]  # (channel, *spatial) like nnU-Net's
    locations = dict(properties["class_locations"])
    locations[annotated_key] = np.array([voxel])
    return {**properties, "class_locations": locations}


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
        if self.probability > 0 and np.random.uniform() < self.probability:
            properties = with_random_centre(data, properties, self.annotated_key)
        return data, seg, seg_prev, properties


class AddedRandomPatchesDataset:
    """Wraps a dataset so that the first ``added`` samples of every batch of ``batch_size`` are centred on a uniformly
    random voxel (their loads are not oversampled: see ``with_added_patches``).

    nnU-Net's training loader calls ``load_case`` exactly ``batch_size`` times per batch, in sample order, each
    process on its own copy; the position in the batch is therefore the count of loads modulo ``batch_size``.
    """

    def __init__(self, dataset, annotated_key: tuple, batch_size: int, added: int):
        if not 0 <= added <= batch_size:
            raise ValueError(f"added must be in [0, batch_size={batch_size}], got {added}")
        self.dataset = dataset
        self.identifiers = dataset.identifiers
        self.annotated_key = annotated_key
        self.batch_size = batch_size
        self.added = added
        self.loads = 0

    def __len__(self) -> int:
        return len(self.identifiers)

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        position, self.loads = self.loads % self.batch_size, self.loads + 1
        if position < self.added:
            properties = with_random_centre(data, properties, self.annotated_key)
        return data, seg, seg_prev, properties
