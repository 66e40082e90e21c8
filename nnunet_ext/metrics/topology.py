"""Topology metrics for 3D masks: Betti numbers (SELMA3D definition) and clDice."""

import numpy as np
from scipy import ndimage
from skimage.measure import euler_number
from skimage.morphology import skeletonize


def _check_3d(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    if mask.ndim != 3:
        raise ValueError(f"{name} must be 3D (Z, Y, X), got shape {mask.shape}")
    return np.asarray(mask, bool)


def _check_same_shape(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs ground truth {gt.shape}")


def betti_numbers(mask: np.ndarray) -> tuple[int, int, int]:
    """Betti numbers (β0, β1, β2) of a 3D foreground mask, as the SELMA3D challenge defines them.

    β0 is the number of 26-connected foreground components; β2 the number of 6-connected
    background components minus one, with the mask padded by one background voxel so the outside
    is a single component; β1 = β0 + β2 − χ, where χ is the Euler characteristic of the
    foreground with 26-connectivity (single voxel χ = 1, hollow cube χ = 2, ring χ = 0).

    Args:
        mask: bool array, shape (Z, Y, X).

    Returns:
        ``(beta0, beta1, beta2)`` as ints.

    Raises:
        ValueError: if ``mask`` is not 3D.
    """
    mask = np.pad(_check_3d(mask), 1, constant_values=False)
    _, beta0 = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 3))
    _, n_background = ndimage.label(~mask, structure=ndimage.generate_binary_structure(3, 1))
    beta2 = n_background - 1
    chi = euler_number(mask, connectivity=3)
    return int(beta0), int(beta0 + beta2 - chi), int(beta2)


def betti_errors(pred_mask: np.ndarray, gt_mask: np.ndarray) -> dict[str, int]:
    """Absolute differences of β0 and β1 between prediction and ground truth.

    Args:
        pred_mask: bool array, shape (Z, Y, X).
        gt_mask: bool array, same shape.

    Returns:
        ``{"betti0_error": |β0_pred − β0_gt|, "betti1_error": |β1_pred − β1_gt|}``.

    Raises:
        ValueError: if the shapes differ or the masks are not 3D.
    """
    _check_same_shape(pred_mask, gt_mask)
    pred_b0, pred_b1, _ = betti_numbers(pred_mask)
    gt_b0, gt_b1, _ = betti_numbers(gt_mask)
    return {"betti0_error": abs(pred_b0 - gt_b0), "betti1_error": abs(pred_b1 - gt_b1)}


def skeleton(mask: np.ndarray) -> np.ndarray:
    """3D skeleton (``skimage.morphology.skeletonize``) in which every foreground component keeps a voxel.

    Lee's thinning deletes some components of a few voxels entirely (an L of three voxels, a 3x2x2 block); those
    are thinner than a centreline, so they count as their own skeleton.
    """
    thin = skeletonize(mask).astype(bool)
    components, _ = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 3))
    vanished = np.setdiff1d(np.unique(components[mask]), np.unique(components[thin]))
    return thin | np.isin(components, vanished)


def cldice(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Centreline Dice (Shit et al., CVPR 2021) of two 3D masks.

    With S(·) the 3D skeleton (:func:`skeleton`):
    Tprec = |S(pred) ∩ gt| / |S(pred)|, Tsens = |S(gt) ∩ pred| / |S(gt)|,
    clDice = 2·Tprec·Tsens / (Tprec + Tsens).

    Empty cases: NaN when both masks are empty; 0 when exactly one is empty; 0 when both
    Tprec and Tsens are 0 (e.g. disjoint structures).

    Args:
        pred_mask: bool array, shape (Z, Y, X).
        gt_mask: bool array, same shape.

    Raises:
        ValueError: if the shapes differ or the masks are not 3D.
    """
    _check_same_shape(pred_mask, gt_mask)
    pred = _check_3d(pred_mask, "pred_mask")
    gt = _check_3d(gt_mask, "gt_mask")
    pred_empty, gt_empty = not pred.any(), not gt.any()
    if pred_empty and gt_empty:
        return float("nan")
    if pred_empty or gt_empty:
        return 0.0
    pred_skeleton, gt_skeleton = skeleton(pred), skeleton(gt)
    # Every component keeps a skeleton voxel, so the denominators are > 0.
    t_prec = np.count_nonzero(pred_skeleton & gt) / np.count_nonzero(pred_skeleton)
    t_sens = np.count_nonzero(gt_skeleton & pred) / np.count_nonzero(gt_skeleton)
    if t_prec + t_sens == 0:
        return 0.0
    return float(2.0 * t_prec * t_sens / (t_prec + t_sens))
