"""Effects separated from noise: paired per-seed differences with a 95 % t-interval, and the check that a
search's configurations differ by more than its seeds do.

- A **paired effect** of configuration B over A is the mean of the per-seed differences ``B_s - A_s`` over
  the n seeds both ran, with the two-sided 95 % Student-t interval ``mean ± t(0.975, n-1) · sd / sqrt(n)``
  (sd with ddof=1). An interval that contains 0 (or n < 2, where no interval exists) is **not resolved**:
  this budget cannot tell the difference from seed noise.
- **Spreads** of a search: the *seed spread* is the pooled within-configuration standard deviation
  (sqrt of the mean of the per-configuration variances, ddof=1, over configurations with >= 2 seeds); the
  *configuration spread* is the standard deviation (ddof=1) of the configurations' means. Sensitivity and
  importance are only shown where the configuration spread exceeds the seed spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cawbench.reporting.aggregate import MISSING

CONFIDENCE = 0.95
NOT_RESOLVED = "not resolved"


@dataclass(frozen=True)
class Effect:
    mean: float
    low: float  # nan when n < 2
    high: float
    n: int

    @property
    def resolved(self) -> bool:
        return self.n >= 2 and math.isfinite(self.low) and (self.low > 0 or self.high < 0)


def t_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> Effect:
    """Mean and two-sided Student-t interval of ``differences`` (their finite values)."""
    from scipy import stats

    values = np.asarray([float(v) for v in differences if v is not None and math.isfinite(float(v))])
    n = len(values)
    if n == 0:
        return Effect(math.nan, math.nan, math.nan, 0)
    mean = float(values.mean())
    if n < 2:
        return Effect(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(values.std(ddof=1)) / math.sqrt(n)
    return Effect(mean, mean - half, mean + half, n)


def format_effect(effect: Effect, digits: int = 2) -> str:
    """``+1.20 [+0.40, +2.00] (3)``; unresolved: ``… (3), not resolved``; no pair: ``–``."""
    if effect.n == 0 or not math.isfinite(effect.mean):
        return MISSING
    text = f"{effect.mean:+.{digits}f}"
    if effect.n >= 2:
        text += f" [{effect.low:+.{digits}f}, {effect.high:+.{digits}f}]"
    text += f" ({effect.n})"
    return text if effect.resolved else f"{text}, {NOT_RESOLVED}"


def paired_effects(
    frame: pd.DataFrame,
    by: Sequence[str],
    item: str,
    against: dict[Any, Any],
    value: str,
    pair_on: Sequence[str] = ("seed",),
) -> pd.DataFrame:
    """For every ``item`` (e.g. a variant) with an entry in ``against`` (item -> the item it is compared
    with), per group of ``by``: the paired effect ``item - against[item]`` on ``value``, matched on
    ``pair_on``. Columns: by..., item, "against", mean, low, high, n, resolved.

    Several runs of one (group, item, seed) are an error: pairing them would be arbitrary."""
    by, pair_on = list(by), list(pair_on)
    columns = [*by, item, "against", "mean", "low", "high", "n", "resolved"]
    if frame.empty or not against:
        return pd.DataFrame(columns=columns)
    work = frame[[*by, item, *pair_on]].copy()
    work["_v"] = pd.to_numeric(frame[value], errors="coerce")
    work = work[work["_v"].notna()]
    dupes = work.duplicated([*by, item, *pair_on], keep=False)
    if dupes.any():
        example = work[dupes].iloc[0]
        raise ValueError(
            f"paired effects: several runs share {dict(example[[*by, item, *pair_on]])}; "
            "pick one configuration per item before pairing"
        )
    out = []
    groups = work.groupby(by, dropna=False, sort=False) if by else [((), work)]
    for key, sub in groups:
        key = key if isinstance(key, tuple) else (key,)
        per_item = {name: runs.set_index(pair_on)["_v"] for name, runs in sub.groupby(item, sort=False)}
        for name, other in against.items():
            if name not in per_item or other not in per_item:
                continue
            diffs = (per_item[name] - per_item[other]).dropna()
            effect = t_interval(diffs.tolist())
            out.append({**dict(zip(by, key)), item: name, "against": other, "mean": effect.mean,
                        "low": effect.low, "high": effect.high, "n": effect.n,
                        "resolved": effect.resolved})  # fmt: skip
    return pd.DataFrame(out, columns=columns)


def effect_cells(table: pd.DataFrame, digits: int = 2) -> list[str]:
    return [
        format_effect(Effect(m, lo, hi, int(n)), digits)
        for m, lo, hi, n in zip(table["mean"], table["low"], table["high"], table["n"])
    ]


@dataclass(frozen=True)
class Spreads:
    """Configuration spread against seed spread of one objective over a search."""

    config_sd: float  # sd (ddof=1) of the configurations' mean objective
    seed_sd: float  # pooled within-configuration sd (ddof=1); nan without a configuration of >= 2 seeds
    n_configs: int
    seeds_per_config: tuple[int, int]  # (fewest, most) seeds of a configuration

    @property
    def informative(self) -> bool:
        """Whether configurations differ by more than seeds do (both spreads known)."""
        return (
            self.n_configs >= 2
            and math.isfinite(self.config_sd)
            and math.isfinite(self.seed_sd)
            and self.config_sd > self.seed_sd
        )

    def describe(self, metric: str) -> str:
        low, high = self.seeds_per_config
        seeds = f"{low}" if low == high else f"{low}-{high}"
        seed = (
            f"{self.seed_sd:.2f} points (pooled sd over seeds within a configuration)"
            if math.isfinite(self.seed_sd)
            else "unknown (no configuration ran on 2 or more seeds)"
        )
        config = f"{self.config_sd:.2f} points" if math.isfinite(self.config_sd) else "unknown"
        return (
            f"configuration spread {config} (sd of the {self.n_configs} configurations' mean `{metric}`) "
            f"against seed spread {seed}; {seeds} seeds per configuration"
        )


def spreads(rows: pd.DataFrame, config: str, value: str) -> Spreads:
    values = pd.to_numeric(rows[value], errors="coerce")
    grouped = rows.assign(_v=values).dropna(subset=["_v"]).groupby(config, sort=False)["_v"]
    means, counts, variances = grouped.mean(), grouped.count(), grouped.var(ddof=1)
    variances = variances[counts >= 2]
    seed_sd = float(math.sqrt(variances.mean())) if len(variances) else math.nan
    config_sd = float(means.std(ddof=1)) if len(means) >= 2 else math.nan
    fewest, most = (int(counts.min()), int(counts.max())) if len(counts) else (0, 0)
    return Spreads(config_sd, seed_sd, int(len(means)), (fewest, most))
