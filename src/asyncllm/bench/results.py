"""One table row: a metric measured for asyncllm and its comparison point, the ratio and the verdict.

The ratio always reads "times better than the comparison": ``ours / peer`` where higher is better
(tokens per second), ``peer / ours`` where lower is better (seconds, bytes). A missing or zero value
gives no ratio, and a target that needs a missing value gives the verdict ``n/a``. A ``share_at_most``
target reads the other way round (asyncllm's value as a share of the peer's, ``ours / peer``, must not
exceed the threshold) for a quantity asyncllm should shrink, e.g. weight bytes against a dense load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

TargetKind = Literal["ratio_at_least", "ours_at_least", "share_at_most", "report_only"]
_KINDS: tuple[TargetKind, ...] = ("ratio_at_least", "ours_at_least", "share_at_most", "report_only")
Verdict = Literal["pass", "fail", "n/a", "-"]


@dataclass(frozen=True)
class Target:
    """``ratio_at_least``: the ratio must reach ``threshold``; ``ours_at_least``: asyncllm's own value
    must (e.g. a fraction of roofline); ``share_at_most``: ``ours / peer`` must not exceed ``threshold``;
    ``report_only``: measured for context, no verdict."""

    kind: TargetKind
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind: unknown target kind {self.kind!r}")

    def describe(self, unit: str) -> str:
        if self.kind == "ratio_at_least":
            return f">= {self.threshold:g}x"
        if self.kind == "ours_at_least":
            return f">= {format_value(self.threshold, unit)}"
        if self.kind == "share_at_most":
            return f"<= {self.threshold:g}x peer"
        return "-"


REPORT_ONLY = Target("report_only")


@dataclass(frozen=True)
class Row:
    """``peer_label`` names what the peer column holds (HF transformers, a stateless engine, a budget)."""

    measurement: str
    metric: str
    unit: str
    ours: float | None
    peer: float | None
    higher_is_better: bool
    target: Target
    peer_label: str

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.peer is None:
            return None
        numerator, denominator = (self.ours, self.peer) if self.higher_is_better else (self.peer, self.ours)
        return numerator / denominator if denominator > 0 else None

    @property
    def share(self) -> float | None:
        """``ours / peer`` (``None`` when either is missing or the peer is not positive)."""
        if self.ours is None or self.peer is None or self.peer <= 0:
            return None
        return self.ours / self.peer

    @property
    def verdict(self) -> Verdict:
        if self.target.kind == "report_only":
            return "-"
        if self.target.kind == "share_at_most":
            share = self.share
            return "n/a" if share is None else ("pass" if share <= self.target.threshold else "fail")
        value = self.ratio if self.target.kind == "ratio_at_least" else self.ours
        if value is None:
            return "n/a"
        return "pass" if value >= self.target.threshold else "fail"

    def to_dict(self) -> dict[str, Any]:
        return {
            "measurement": self.measurement,
            "metric": self.metric,
            "unit": self.unit,
            "asyncllm": self.ours,
            "peer": self.peer,
            "peer_label": self.peer_label,
            "higher_is_better": self.higher_is_better,
            "ratio": self.ratio,
            "share": self.share,
            "target": {"kind": self.target.kind, "threshold": self.target.threshold,
                       "text": self.target.describe(self.unit)},
            "verdict": self.verdict,
        }


def format_value(value: float | None, unit: str) -> str:
    """A value for the table in its unit (``n/a`` when missing)."""
    if value is None:
        return "n/a"
    if unit == "fraction":
        return f"{100.0 * value:.1f}%"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "MB":
        return f"{value:.0f} MB"
    if unit == "tok/s":
        return f"{value:.1f} tok/s"
    return f"{value:.4g} {unit}".rstrip()


def format_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"
