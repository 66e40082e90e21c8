"""Which unannotated slices to annotate next: per-slice uncertainty scores and the ranking (numpy only).

Predictions are class-probability arrays (C, *spatial) of one case, in the axis order of nnU-Net's image reader
(as nnU-Net's predictor returns probabilities). Voxel scores, averaged over each slice along the annotation axis:

- ``entropy``: entropy (natural log, nats) of the mean prediction, ``-sum_c p_c ln p_c``; 0 where one class has
  probability 1, ln C where all C classes are equally likely.
- ``mirror`` and ``models``: disagreement of several predictions of the same case (under different test-time
  mirrorings; of two networks such as teacher and student or the two CPS branches), the mean squared distance
  of each prediction's class-probability vector to their mean, ``sum_c Var_k p_k,c`` (population variance over
  the K predictions). 0 where all agree; two one-hot predictions that disagree give 0.5.

The ranking takes the highest-scoring unannotated slices over all cases, greedily, skipping slices within
``min_gap`` of an annotated or an already chosen slice of the same case.
"""

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SCORES = ("entropy", "mirror", "models")
SUGGESTIONS_CSV = "suggestions.csv"  # the file `nnunet-ext suggest` writes and the annotation loop reads
DISAGREEMENT_SCORES = ("mirror", "models")


class PredictionMoments:
    """Running mean and spread of predictions added one at a time (so that only two arrays are kept)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = self.total_squares = None

    @classmethod
    def of(cls, predictions: Iterable[np.ndarray]) -> "PredictionMoments":
        moments = cls()
        for prediction in predictions:
            moments.add(prediction)
        return moments

    def add(self, probabilities: np.ndarray) -> None:
        """Add one (C, *spatial) class-probability array; all must have the same shape."""
        p = np.asarray(probabilities, dtype=np.float32)
        if p.ndim < 2:
            raise ValueError(f"probabilities must be (C, *spatial), got shape {p.shape}")
        if self.total is None:
            self.total, self.total_squares = p.copy(), p * p
        elif p.shape != self.total.shape:
            raise ValueError(f"predictions of one case must share their shape: {p.shape} vs {self.total.shape}")
        else:
            self.total += p
            self.total_squares += p * p
        self.count += 1

    def mean(self) -> np.ndarray:
        """(C, *spatial) mean prediction."""
        if not self.count:
            raise ValueError("no prediction was added")
        return self.total / self.count

    def entropy(self) -> np.ndarray:
        """(*spatial) entropy of the mean prediction in nats (0 ln 0 = 0)."""
        p = self.mean()
        return np.maximum(-(p * np.log(np.where(p > 0, p, 1))).sum(0), 0)  # p = 0 adds 0 * ln 1

    def disagreement(self) -> np.ndarray:
        """(*spatial) sum over classes of the population variance over the predictions (0 for one prediction)."""
        mean = self.mean()
        return np.maximum((self.total_squares / self.count - mean * mean).sum(0), 0)


def voxel_scores(moments: PredictionMoments, score: str) -> np.ndarray:
    """(*spatial) voxel score ``score`` (one of SCORES) of a case's predictions."""
    if score == "entropy":
        return moments.entropy()
    if score in DISAGREEMENT_SCORES:
        if moments.count < 2:
            raise ValueError(f"the {score} score compares several predictions, got {moments.count}")
        return moments.disagreement()
    raise ValueError(f"unknown score {score!r}: choose one of {', '.join(SCORES)}")


def per_slice_mean(voxel_map: np.ndarray, axis: int) -> np.ndarray:
    """(n_slices,) float64 mean of a (*spatial) map over each slice along ``axis``."""
    voxel_map = np.asarray(voxel_map, dtype=np.float64)
    other = tuple(a for a in range(voxel_map.ndim) if a != axis)
    return voxel_map.mean(axis=other)


def slice_scores(predictions: Iterable[np.ndarray], score: str, axis: int) -> np.ndarray:
    """(n_slices,) per-slice score of one case's predictions (one for ``entropy``, several for the others)."""
    return per_slice_mean(voxel_scores(PredictionMoments.of(predictions), score), axis)


def annotated_slices_of_label(label: np.ndarray, axis: int, ignore_label: int) -> list[int]:
    """Slices along ``axis`` of a (*spatial) or (1, *spatial) label array that hold a voxel other than ignore."""
    label = np.asarray(label)
    label = label[0] if label.ndim == 4 and label.shape[0] == 1 else label
    other = tuple(a for a in range(label.ndim) if a != axis)
    return [int(i) for i in np.flatnonzero((label != ignore_label).any(axis=other))]


@dataclass(frozen=True)
class Suggestion:
    case: str
    index: int  # slice index along the annotation axis
    score: float


def rank_slices(scores: Mapping[str, Sequence[float]], annotated: Mapping[str, Iterable[int]], k: int,
                min_gap: int = 1) -> list[Suggestion]:
    """Choose up to ``k`` slices over all cases with the highest scores, greedily.

    A slice is skipped when it is within ``min_gap`` slices (``|i - j| <= min_gap``) of an annotated slice or of
    an already chosen slice of the same case; annotated slices themselves are never chosen (also with
    ``min_gap=0``). Ties go to the lower case identifier, then the lower slice index.

    Args:
        scores: case -> per-slice scores along the annotation axis.
        annotated: case -> annotated slice indices (cases missing here have none).
        k: how many slices to choose (>= 1).
        min_gap: the gap (>= 0) as above.

    Returns:
        The chosen slices in the order chosen (highest score first); fewer than ``k`` when no other slice is
        allowed.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if min_gap < 0:
        raise ValueError(f"min_gap must be at least 0, got {min_gap}")
    # Highest score first, then the lower case identifier, then the lower index.
    candidates = sorted((-float(s), case, i) for case, values in scores.items() for i, s in enumerate(values))
    taken = {case: set(annotated.get(case, ())) for case in scores}
    chosen = []
    for negative_score, case, index in candidates:
        if len(chosen) == k:
            break
        if any(abs(index - j) <= min_gap for j in taken[case]):
            continue
        taken[case].add(index)
        chosen.append(Suggestion(case, index, -negative_score))
    return chosen


def mirror_flips(allowed_mirroring_axes: Sequence[int] | None, transpose_forward: Sequence[int],
                 patch_dims: int) -> list[tuple[int, ...]]:
    """The mirrorings nnU-Net's test-time augmentation uses, as axes of the raw image array to flip.

    nnU-Net mirrors over every non-empty combination of ``allowed_mirroring_axes`` (axes of the network's patch,
    in preprocessed order) and averages with the unmirrored prediction. A 2D configuration's patch axes are the
    last two of the 3D preprocessed array. Preprocessed axis ``a`` is raw axis ``transpose_forward[a]``.

    Returns:
        ``()`` (no flip) first, then each combination in nnU-Net's order; only ``[()]`` without mirroring axes.
    """
    offset = len(transpose_forward) - patch_dims
    raw = [int(transpose_forward[a + offset]) for a in (allowed_mirroring_axes or ())]
    return [()] + [tuple(sorted(c)) for n in range(1, len(raw) + 1) for c in itertools.combinations(raw, n)]
