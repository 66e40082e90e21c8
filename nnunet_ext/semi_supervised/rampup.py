"""Schedules over training, plain floats in any progress unit: ramp-ups of unsupervised loss weights and the cosine
decay of a learning rate."""

import math


def sigmoid_rampup(progress: float, length: float) -> float:
    """Sigmoid-shaped ramp-up of Laine & Aila / Tarvainen & Valpola: exp(-5 (1 - t)^2), t = clip(progress / length, 0, 1).

    Args:
        progress: elapsed training, in the same unit as ``length`` (e.g. fraction of training, or epochs).
        length: ramp-up length; ``length <= 0`` means no ramp-up.

    Returns:
        float in [exp(-5), 1]; 1.0 once ``progress >= length`` or when ``length <= 0``.
    """
    if length <= 0:
        return 1.0
    t = min(max(progress / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def linear_warmup(progress: float, start: float, end: float) -> float:
    """0 up to ``start``, linear from 0 to 1 between ``start`` and ``end``, then 1.

    Args:
        progress, start, end: the same unit (e.g. fraction of training, or epochs).

    Raises:
        ValueError: unless ``start < end``.
    """
    if not start < end:
        raise ValueError(f"linear_warmup needs start < end, got start={start}, end={end}")
    if progress <= start:
        return 0.0
    if progress >= end:
        return 1.0
    return (progress - start) / (end - start)


def cosine_decay(progress: float, length: float) -> float:
    """Cosine decay from 1 to 0 over ``length``: (1 + cos(pi t)) / 2, t = clip(progress / length, 0, 1).

    Raises:
        ValueError: unless ``length > 0``.
    """
    if not length > 0:
        raise ValueError(f"cosine_decay needs length > 0, got {length}")
    t = min(max(progress / length, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))
