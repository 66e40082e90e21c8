"""Mean-Teacher consistency with a sharpened, confidence-filtered teacher target on unlabeled voxels."""

import torch
import torch.nn.functional as F

from nnunet_ext.semi_supervised._checks import check_batch_tensor, check_voxel_mask


def sharpened_consistency_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 0.5,
    threshold: float = 0.8,
    confidence_temperature: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-Teacher consistency on unlabeled voxels: KL(sharpened teacher || student), confident voxels only.

    The target is ``softmax(teacher_logits / temperature)`` over the class dim. A voxel counts when ``mask`` is True
    there and the teacher's confidence, the max over classes of ``softmax(teacher_logits / confidence_temperature)``
    (by default the target itself), is >= ``threshold``. The loss is the mean over counted voxels of
    ``sum_c target_c * (log target_c - log_softmax(student_logits)_c)``, computed in float32.

    Args:
        student_logits: (B, C, H, W) or (B, C, D, H, W), any float dtype; receives the gradient.
        teacher_logits: same shape as ``student_logits``; detached here, so no gradient reaches the teacher.
        mask: (B, 1, *spatial) bool, True = unlabeled (see ``unlabeled_mask``).
        temperature: > 0; below 1 sharpens the teacher distribution.
        threshold: in [0, 1]; minimum confidence for a voxel to count.
        confidence_temperature: > 0 or None (= ``temperature``); 1 filters on the teacher's raw probability, which
            sharpening would inflate (with 2 classes and T = 0.5 a raw 0.67 becomes 0.8).

    Returns:
        ``(loss, passed_fraction)``: ``loss`` is a float32 scalar with a gradient to ``student_logits`` (0.0, still
        connected to the graph, when no voxel counts); ``passed_fraction`` is a detached float32 scalar, counted
        voxels / unlabeled voxels (0.0 when no voxel is unlabeled). Neither forces a device synchronisation.

    Raises:
        ValueError: on mismatched logits shapes, a mask that is not (B, 1, *spatial), a temperature <= 0 or
            ``threshold`` outside [0, 1].
        TypeError: when ``mask`` is not bool.
    """
    check_batch_tensor("student_logits", student_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                         f"{tuple(student_logits.shape)} must have the same shape")
    check_voxel_mask("mask", mask, student_logits)
    if confidence_temperature is None:
        confidence_temperature = temperature
    for name, value in (("temperature", temperature), ("confidence_temperature", confidence_temperature)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")

    target = torch.softmax(teacher_logits.detach().float() / temperature, dim=1)
    log_student = F.log_softmax(student_logits.float(), dim=1)
    # xlogy: a target probability of exactly 0 contributes 0, not 0 * log 0 = nan.
    kl = (torch.xlogy(target, target) - target * log_student).sum(dim=1, keepdim=True)
    confidence = (target if confidence_temperature == temperature else
                  torch.softmax(teacher_logits.detach().float() / confidence_temperature, dim=1))
    counted = mask & (confidence.amax(dim=1, keepdim=True) >= threshold)
    n_counted = counted.sum()
    # where() instead of indexing keeps the shape static (no sync) and yields 0.0 with a grad_fn when nothing counts.
    loss = torch.where(counted, kl, 0.0).sum() / n_counted.clamp_min(1)
    passed_fraction = (n_counted / mask.sum().clamp_min(1)).float()
    return loss, passed_fraction
