"""Choices made on the validation split, never on the test split: a run's checkpoint (the evaluation step with the
best --select-by score) and a method's tuned settings (the grid point whose chosen checkpoint scored best).

A score is one number of ``evaluation.evaluate``'s greedy scores, named ``<group or task>.<metric>`` (``gold.rouge_l``:
the MiniLLM paper's Rouge-L, its checkpoint choice). Higher is better; a NaN score never wins.
"""
from __future__ import annotations

import math
from typing import Optional


def selection_score(scores: dict[str, dict[str, float]], select_by: str) -> float:
    """``scores[group][metric]`` for ``select_by = "group.metric"``; KeyError naming what the scores hold if absent."""
    group, metric = select_by.split(".")
    if metric not in scores.get(group, {}):
        held = ", ".join(f"{g}.{m}" for g, metrics in scores.items() for m in metrics)
        raise KeyError(f"--select-by {select_by}: the validation scores have no such figure (they have: {held})")
    return scores[group][metric]


def improves(score: float, best: Optional[float]) -> bool:
    """Whether ``score`` beats ``best`` (None: nothing yet): strictly higher, so that a tie keeps the earlier one;
    a NaN never improves, and anything improves on a NaN."""
    if math.isnan(score):
        return False
    return best is None or math.isnan(best) or score > best


def best_of(candidates: list[tuple[str, Optional[float]]]) -> str:
    """The name of the candidate ``(name, validation score)`` with the best score (the first of equals; None
    scores, runs without a validation split, never win); ValueError if none has a score."""
    chosen, best = None, None
    for name, score in candidates:
        if score is not None and improves(score, best):
            chosen, best = name, score
    if chosen is None:
        raise ValueError(f"no candidate has a validation score: {[name for name, _ in candidates]}")
    return chosen
