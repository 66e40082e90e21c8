"""Slice-wise metrics for sparsely annotated volumes (annotations on a few slices along one axis)."""

import numpy as np

from nnunet_ext.metrics.dice import dice


def _check_same_shape(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs ground truth {gt.shape}")


def _check_axis(array: np.ndarray, axis: int) -> int:
    if not -array.ndim <= axis < array.ndim:
        raise ValueError(f"axis {axis} out of range for an array of {array.ndim} dimensions")
    return axis % array.ndim


def per_slice_dice(pred_mask: np.ndarray, gt_mask: np.ndarray, axis: int = 0) -> np.ndarray:
    """Dice of each slice along ``axis``.

    Args:
        pred_mask: bool array, shape (Z, Y, X) (any number of dimensions works).
        gt_mask: bool array, same shape as ``pred_mask``.
        axis: axis along which slices are taken.

    Returns:
        float64 array of shape (pred_mask.shape[axis],); NaN for slices empty in both masks.

    Raises:
        ValueError: if the shapes differ or ``axis`` is out of range.
    """
    _check_same_shape(pred_mask, gt_mask)
    axis = _check_axis(pred_mask, axis)
    pred = np.moveaxis(np.asarray(pred_mask, bool), axis, 0)
    gt = np.moveaxis(np.asarray(gt_mask, bool), axis, 0)
    return np.array([dice(p, g) for p, g in zip(pred, gt)], dtype=np.float64)


def mean_slice_dice(pred_mask: np.ndarray, gt_mask: np.ndarray, axis: int = 0) -> float:
    """Mean of :func:`per_slice_dice` over slices along ``axis``.

    Slices empty in both prediction and ground truth are excluded (NaN-mean), as Pagano et al.
    average over slices that contain something. NaN if every slice is empty in both.

    Args:
        pred_mask: bool array, shape (Z, Y, X).
        gt_mask: bool array, same shape as ``pred_mask``.
        axis: axis along which slices are taken.

    Raises:
        ValueError: if the shapes differ or ``axis`` is out of range.
    """
    values = per_slice_dice(pred_mask, gt_mask, axis)
    if np.all(np.isnan(values)):
        return float("nan")
    return float(np.nanmean(values))


def masked_dice(pred_mask: np.ndarray, gt_mask: np.ndarray, region: np.ndarray) -> float:
    """Dice restricted to voxels where ``region`` is True (e.g. unannotated or held-out slices).

    Args:
        pred_mask: bool array, shape (Z, Y, X).
        gt_mask: bool array, same shape.
        region: bool array, same shape; voxels outside it are ignored.

    Returns:
        Dice inside ``region``; NaN when both masks are empty there.

    Raises:
        ValueError: if the shapes differ.
    """
    _check_same_shape(pred_mask, gt_mask)
    if region.shape != pred_mask.shape:
        raise ValueError(f"shape mismatch: region {region.shape} vs masks {pred_mask.shape}")
    region = np.asarray(region, bool)
    return dice(np.asarray(pred_mask, bool)[region], np.asarray(gt_mask, bool)[region])


def slice_distance_to_annotation(sparse_label: np.ndarray, ignore_label: int, axis: int = 0) -> np.ndarray:
    """Distance, in slices along ``axis``, from each slice to the nearest annotated slice.

    A slice is annotated when it holds at least one voxel whose value is not ``ignore_label``.

    Args:
        sparse_label: integer label array, shape (Z, Y, X).
        ignore_label: value marking unannotated voxels.
        axis: axis along which slices are taken.

    Returns:
        int64 array of shape (sparse_label.shape[axis],); 0 on annotated slices.

    Raises:
        ValueError: if no slice is annotated or ``axis`` is out of range.
    """
    axis = _check_axis(sparse_label, axis)
    other_axes = tuple(a for a in range(sparse_label.ndim) if a != axis)
    annotated = np.flatnonzero(np.any(sparse_label != ignore_label, axis=other_axes))
    if annotated.size == 0:
        raise ValueError(f"no slice along axis {axis} holds a voxel other than ignore label {ignore_label}")
    index = np.arange(sparse_label.shape[axis])
    return np.abs(index[:, None] - annotated[None, :]).min(axis=1).astype(np.int64)


def dice_by_distance(
    pred_mask: np.ndarray, gt_mask: np.ndarray, distances: np.ndarray, axis: int = 0
) -> dict[int, float]:
    """Dice pooled over all voxels of the slices at each distance from the annotation.

    Args:
        pred_mask: bool array, shape (Z, Y, X).
        gt_mask: bool array, same shape.
        distances: int array of shape (pred_mask.shape[axis],), e.g. from
            :func:`slice_distance_to_annotation`.
        axis: axis along which slices are taken.

    Returns:
        ``{distance: dice}`` for each distinct distance, ascending; NaN where both masks are
        empty on all slices at that distance.

    Raises:
        ValueError: if the shapes differ, ``distances`` has the wrong length or ``axis`` is out
            of range.
    """
    _check_same_shape(pred_mask, gt_mask)
    axis = _check_axis(pred_mask, axis)
    distances = np.asarray(distances)
    if distances.shape != (pred_mask.shape[axis],):
        raise ValueError(
            f"distances must have shape ({pred_mask.shape[axis]},) for axis {axis}, got {distances.shape}"
        )
    pred = np.moveaxis(np.asarray(pred_mask, bool), axis, 0)
    gt = np.moveaxis(np.asarray(gt_mask, bool), axis, 0)
    return {int(d): dice(pred[distances == d], gt[distances == d]) for d in np.unique(distances)}


def precision_recall(pred_mask: np.ndarray, gt_mask: np.ndarray) -> tuple[float, float]:
    """Voxel precision TP / |pred| and recall TP / |gt|.

    Args:
        pred_mask: bool array of any shape.
        gt_mask: bool array, same shape.

    Returns:
        ``(precision, recall)``; precision is NaN when ``pred_mask`` is empty, recall NaN when
        ``gt_mask`` is empty.

    Raises:
        ValueError: if the shapes differ.
    """
    _check_same_shape(pred_mask, gt_mask)
    pred = np.asarray(pred_mask, bool)
    gt = np.asarray(gt_mask, bool)
    true_positives = np.count_nonzero(pred & gt)
    n_pred, n_gt = np.count_nonzero(pred), np.count_nonzero(gt)
    precision = true_positives / n_pred if n_pred else float("nan")
    recall = true_positives / n_gt if n_gt else float("nan")
    return float(precision), float(recall)
