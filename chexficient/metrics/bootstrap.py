"""Confidence intervals as the paper reports them: percentile bootstrap over test samples, and mean ± 1.96·SE over
seeds."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm


def flatten_metrics(result: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Scalar leaves of a nested metric dict, keyed "a/b" (e.g. "auroc/Edema"); lists and strings are dropped."""
    flat: dict[str, float] = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
        elif isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def bootstrap_ci(
    metric: Callable[[np.ndarray], Mapping[str, Any]],
    num_samples: int,
    *,
    num_resamples: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap of every scalar that `metric(indices)` returns.

    `metric` takes an index array into the `num_samples` test samples and returns a (nested) dict of metrics; it is
    called once on all samples for the point estimate and `num_resamples` times on samples drawn with replacement.
    A resample where a value is undefined (NaN, e.g. a class with one label value) is left out of that value's
    interval. Returns {name: {"value", "median", "ci_low", "ci_high", "num_resamples"}}; "median" is the resamples'
    median, which LLaVA-Rad's tables report.
    """
    if num_samples < 1:
        raise ValueError("the bootstrap needs at least one sample.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    point = flatten_metrics(metric(np.arange(num_samples)))
    rng = np.random.default_rng(seed)
    draws = {name: np.full(num_resamples, np.nan) for name in point}
    for r in tqdm(range(num_resamples), desc="bootstrap", disable=not progress, leave=False):
        resampled = flatten_metrics(metric(rng.integers(0, num_samples, num_samples)))
        for name, value in resampled.items():
            if name in draws:
                draws[name][r] = value
    tail = (1 - confidence) / 2 * 100
    result = {}
    for name, value in point.items():
        defined = draws[name][~np.isnan(draws[name])]
        low, median, high = np.percentile(defined, [tail, 50, 100 - tail]) if defined.size else (np.nan,) * 3
        result[name] = {
            "value": value,
            "median": float(median),
            "ci_low": float(low),
            "ci_high": float(high),
            "num_resamples": int(defined.size),
        }
    return result


def seed_summary(values: Sequence[float]) -> dict[str, float]:
    """Mean ± 1.96·SE over runs with different seeds (SE = sample std / sqrt(n)); one run has a zero-width CI."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("seed_summary needs at least one value.")
    se = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0
    mean = float(values.mean())
    return {
        "mean": mean,
        "se": se,
        "ci_low": mean - 1.96 * se,
        "ci_high": mean + 1.96 * se,
        "num_seeds": int(values.size),
    }
