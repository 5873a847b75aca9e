"""AURAC: the area under the rank-accuracy curve, normalised by the rank span."""

from __future__ import annotations

import math
from collections.abc import Sequence


def aurac(ranks: Sequence[int], accuracy: Sequence[float], log2: bool = False) -> float:
    """Return the trapezoid area under accuracy(rank), divided by the span of the x axis.

    The x axis is the rank, or log2(rank) with ``log2=True``. Rank 0 (the base model)
    is left out, because log2(0) is undefined and the curve is about the adapter's ranks.
    A constant accuracy a gives AURAC a on either axis.

    Example:
        >>> aurac([1, 2, 4], [0.0, 0.5, 1.0])
        0.5833333333333334
        >>> aurac([1, 2, 4], [0.0, 0.5, 1.0], log2=True)
        0.5
    """
    if len(ranks) != len(accuracy):
        raise ValueError(f"got {len(ranks)} ranks but {len(accuracy)} accuracies")
    points = sorted((rank, acc) for rank, acc in zip(ranks, accuracy) if rank >= 1)
    if len(points) < 2:
        raise ValueError(f"AURAC needs at least two ranks >= 1, got {sorted(ranks)}")
    xs = [math.log2(rank) if log2 else float(rank) for rank, _ in points]
    ys = [acc for _, acc in points]
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])
