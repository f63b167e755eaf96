"""Budgets: ``'5%'``, ``'100'``, ``100`` or ``0.05`` -> a number of examples."""

from __future__ import annotations

import math


def parse_budget(budget: str | int | float, n: int) -> int:
    """``'5%'`` -> round-half-up(0.05 * n); ``'100'``/``100`` -> 100; ``0.05`` -> fraction."""
    if isinstance(budget, str):
        text = budget.strip()
        if text.endswith("%"):
            frac = float(text[:-1]) / 100.0
            k = math.floor(frac * n + 0.5)
        elif "." in text:
            k = math.floor(float(text) * n + 0.5)
        else:
            k = int(text)
    elif isinstance(budget, float):
        k = math.floor(budget * n + 0.5)
    else:
        k = int(budget)
    if k < 0:
        raise ValueError(f"budget must be non-negative, got {budget!r}")
    if k > n:
        raise ValueError(f"budget {budget!r} = {k} examples is larger than the pool ({n} examples)")
    return k

