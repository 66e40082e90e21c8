"""Which axis the sparse annotations were made along, in nnU-Net's preprocessed (transposed) array order.

Order of evidence: dataset.json's ``annotation_axis`` (written by our converters and ``synth``, counted in
the raw array order nnU-Net's reader returns), else the label pattern (the axis along which annotated voxels
fill whole slices), else the lowest-resolution axis.
"""

from collections.abc import Iterable, Sequence

import numpy as np

DATASET_JSON_KEY = "annotation_axis"
ANNOTATED_SLICES_KEY = "annotated_slices"  # dataset.json: case -> annotated slice indices along that axis


def axis_from_dataset_json(dataset_json: dict, transpose_forward: Sequence[int]) -> int | None:
    """dataset.json's raw-order axis mapped into preprocessed order (``transpose_forward``), or None if absent."""
    raw_axis = dataset_json.get(DATASET_JSON_KEY)
    if raw_axis is None:
        return None
    if raw_axis not in range(len(transpose_forward)):
        raise ValueError(f"dataset.json {DATASET_JSON_KEY}={raw_axis!r} is not an axis of a "
                         f"{len(transpose_forward)}D image: fix dataset.json (0 = first array axis)")
    return list(transpose_forward).index(raw_axis)


def axis_from_labels(segmentations: Iterable[np.ndarray], ignore_label: int) -> int | None:
    """The axis along which annotated voxels form whole slices, judged over several label volumes.

    Args:
        segmentations: label arrays of shape (1, *spatial) or (*spatial), nnU-Net's preprocessed segmentations
            (-1 marks voxels outside the cropped image; they count as neither annotated nor unannotated).
        ignore_label: the dataset's ignore label.
    Returns:
        The one axis for which every slice of every volume is entirely annotated or entirely unannotated and at
        least one volume has both kinds of slices; None if no axis or several axes qualify.
    """
    candidates, evidence = None, set()
    for seg in segmentations:
        seg = np.asarray(seg)
        seg = seg[0] if seg.ndim > 1 and seg.shape[0] == 1 else seg
        annotated = (seg != ignore_label) & (seg >= 0)
        unannotated = seg == ignore_label
        axes = set()
        for axis in range(seg.ndim):
            other = tuple(a for a in range(seg.ndim) if a != axis)
            has_annotated, has_unannotated = annotated.any(axis=other), unannotated.any(axis=other)
            if not (has_annotated & has_unannotated).any():
                axes.add(axis)
                if has_annotated.any() and has_unannotated.any():
                    evidence.add(axis)
        candidates = axes if candidates is None else candidates & axes
    qualified = (candidates or set()) & evidence
    return qualified.pop() if len(qualified) == 1 else None


def lowest_resolution_axis(spacing: Sequence[float]) -> int:
    """Index of the largest voxel spacing (first one on ties)."""
    return int(np.argmax(spacing))


def find_annotation_axis(dataset_json: dict, transpose_forward: Sequence[int], spacing: Sequence[float],
                         segmentations: Iterable[np.ndarray], ignore_label: int) -> tuple[int, str]:
    """(axis in preprocessed order, where it came from) following the module's order of evidence."""
    axis = axis_from_dataset_json(dataset_json, transpose_forward)
    if axis is not None:
        return axis, f"dataset.json {DATASET_JSON_KEY}={dataset_json[DATASET_JSON_KEY]} (raw order)"
    axis = axis_from_labels(segmentations, ignore_label)
    if axis is not None:
        return axis, "inferred from the label pattern (annotated voxels fill whole slices along it)"
    return lowest_resolution_axis(spacing), f"lowest-resolution axis of spacing {list(spacing)}"
