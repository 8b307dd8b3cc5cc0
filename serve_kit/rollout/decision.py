"""The decision engine: a step's figures and the thresholds -> advance, hold or rollback. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .analysis import TargetFigures

Action = Literal["pass", "hold", "rollback"]


@dataclass(frozen=True)
class Thresholds:
    max_error_rate: float = 0.01
    """Largest share of the candidate's answers that may be server errors (500/503/504)."""
    max_p99_ratio: float = 1.5
    """Largest candidate p99 / champion p99 (when the champion has no p99 of its own, not judged)."""
    min_agreement: float | None = None
    """Smallest mean agreement with the champion (top-1 or cosine), when compared answers exist."""
    min_requests: int = 50
    """Fewer candidate answers in a check: hold (too little evidence to judge either way)."""


@dataclass
class Verdict:
    action: Action
    reasons: list[str] = field(default_factory=list)


def judge(t: Thresholds, candidate: TargetFigures, champion: TargetFigures) -> Verdict:
    """One check. rollback if any rule with enough evidence fails; hold if there is not enough
    evidence; else pass. An error rate is judged on its own evidence even below min_requests once
    its errors alone exceed what min_requests answers could tolerate (a dead candidate fails fast)."""
    failed: list[str] = []
    n = candidate.requests
    rate = candidate.error_rate
    if rate is not None and rate > t.max_error_rate and (n >= t.min_requests or candidate.errors > t.max_error_rate * t.min_requests):
        failed.append(f"error rate {rate:.4f} > {t.max_error_rate:g} ({candidate.errors}/{n})")
    if n < t.min_requests:
        if failed:
            return Verdict("rollback", failed)
        return Verdict("hold", [f"{n} candidate requests < {t.min_requests}"])
    if candidate.p99_s is not None and champion.p99_s:
        ratio = candidate.p99_s / champion.p99_s
        if ratio > t.max_p99_ratio:
            failed.append(f"p99 ratio {ratio:.2f} > {t.max_p99_ratio:g} "
                          f"({candidate.p99_s * 1e3:.1f} ms vs {champion.p99_s * 1e3:.1f} ms)")
    if t.min_agreement is not None and candidate.agreement is not None and candidate.agreement < t.min_agreement:
        failed.append(f"agreement {candidate.agreement:.4f} < {t.min_agreement:g} ({candidate.compared} compared)")
    if failed:
        return Verdict("rollback", failed)
    return Verdict("pass", ["all checks within thresholds"])
