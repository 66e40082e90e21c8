"""annotation_axis.py on hand-built label volumes."""

import numpy as np
import pytest

from nnunet_ext.annotation_axis import (
    axis_from_dataset_json,
    axis_from_labels,
    find_annotation_axis,
    lowest_resolution_axis,
)

IGNORE = 3


def sparse_volume(shape=(8, 4, 6), axis=0, slices=(0, 4)):
    """Ignore everywhere except whole slices along `axis`, which hold labels 0/1/2."""
    volume = np.full(shape, IGNORE)
    rng = np.random.default_rng(0)
    for s in slices:
        index = [slice(None)] * len(shape)
        index[axis] = s
        volume[tuple(index)] = rng.integers(0, 3, size=volume[tuple(index)].shape)
    return volume


@pytest.mark.parametrize("raw_axis, transpose_forward, expected", [
    (0, [0, 1, 2], 0),
    (0, [2, 0, 1], 1),  # raw axis 0 ends up second after the transposition
    (2, [2, 0, 1], 0),
])
def test_axis_from_dataset_json_follows_transpose_forward(raw_axis, transpose_forward, expected):
    assert axis_from_dataset_json({"annotation_axis": raw_axis}, transpose_forward) == expected


def test_axis_from_dataset_json_absent_or_invalid():
    assert axis_from_dataset_json({}, [0, 1, 2]) is None
    with pytest.raises(ValueError, match="fix dataset.json"):
        axis_from_dataset_json({"annotation_axis": 3}, [0, 1, 2])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_axis_from_labels_finds_the_slicing_axis(axis):
    assert axis_from_labels([sparse_volume(axis=axis, slices=(1, 3))[None]], IGNORE) == axis


def test_axis_from_labels_ignores_outside_voxels_and_unannotated_volumes():
    cropped = sparse_volume(axis=2, slices=(0, 5))
    cropped[:, 0, :] = -1  # outside nnU-Net's crop: neither annotated nor unannotated
    fully_unlabeled = np.full((8, 4, 6), IGNORE)
    assert axis_from_labels([fully_unlabeled, cropped], IGNORE) == 2


def test_axis_from_labels_gives_up_when_nothing_or_everything_qualifies():
    scattered = np.full((4, 4, 4), IGNORE)
    scattered[1, 2, 3] = 1  # a single annotated voxel: its slices are mixed along every axis
    scattered[2, 0, 1] = 0
    assert axis_from_labels([scattered], IGNORE) is None
    assert axis_from_labels([np.full((4, 4, 4), IGNORE)], IGNORE) is None  # no evidence for any axis
    # Volumes that disagree leave no common axis.
    assert axis_from_labels([sparse_volume(axis=0), sparse_volume(axis=1, slices=(0, 2))], IGNORE) is None


def test_lowest_resolution_axis():
    assert lowest_resolution_axis([1.0, 4.0, 1.0]) == 1
    assert lowest_resolution_axis([2.0, 2.0, 1.0]) == 0


def test_find_annotation_axis_order_of_evidence():
    labels = [sparse_volume(axis=1, slices=(0, 2))]
    axis, source = find_annotation_axis({"annotation_axis": 0}, [1, 0, 2], [1, 1, 5], labels, IGNORE)
    assert (axis, "dataset.json" in source) == (1, True)
    axis, source = find_annotation_axis({}, [0, 1, 2], [1, 1, 5], labels, IGNORE)
    assert (axis, "label pattern" in source) == (1, True)
    axis, source = find_annotation_axis({}, [0, 1, 2], [1, 1, 5], [np.full((4, 4, 4), IGNORE)], IGNORE)
    assert (axis, "lowest-resolution" in source) == (2, True)
