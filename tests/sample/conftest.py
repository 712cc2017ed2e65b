"""Chi-square goodness-of-fit helper for the sampler tests (scipy is not a dependency)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest

# z-score of the upper 1e-4 tail of the standard normal; tests use fixed seeds, so this only
# sets how far from the target a sampled histogram may be before the test fails.
_Z_1E4 = 3.719


def chi2_critical(df: int, z: float = _Z_1E4) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile with df degrees of freedom."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_statistic(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson statistic over cells with positive expected probability, and its degrees of freedom."""
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum()
    keep = probs > 0
    expected = counts.sum() * probs[keep]
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    return stat, int(keep.sum()) - 1


def fits(counts: np.ndarray, probs: np.ndarray) -> bool:
    """True when counts are consistent with probs (no mass on zero-probability cells, chi-square ok)."""
    probs = np.asarray(probs, dtype=np.float64)
    if np.asarray(counts)[probs <= 0].sum() > 0:
        return False
    stat, df = chi2_statistic(counts, probs)
    if df == 0:
        return True
    return stat < chi2_critical(df)


@pytest.fixture
def assert_fits() -> Callable[[np.ndarray, np.ndarray], None]:
    def check(counts: np.ndarray, probs: np.ndarray) -> None:
        probs = np.asarray(probs, dtype=np.float64)
        stray = np.asarray(counts)[probs <= 0].sum()
        assert stray == 0, f"{stray} samples on zero-probability tokens: counts={counts} probs={probs}"
        stat, df = chi2_statistic(counts, probs)
        assert df == 0 or stat < chi2_critical(df), \
            f"chi2={stat:.1f} >= {chi2_critical(df):.1f} (df={df}); counts={counts} expected={probs * np.sum(counts)}"
    return check
