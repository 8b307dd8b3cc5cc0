"""The rollout loop: optional shadow phase, then the weight steps, each held for its interval and
checked every check period; rollback (champion 100%) at the first failed check, hold while there is
too little evidence, advance when a step's interval passed with every check good."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ServeKitError, UsageError
from . import analysis
from .decision import Thresholds, judge
from .driver import Fleet, target_dict


@dataclass
class Plan:
    endpoint: str
    candidate: tuple[str, int]
    champion: tuple[str, int] | None = None
    """None: the current route's first target (its latest version when the route names none)."""
    shadow_s: float = 0.0
    steps: tuple[int, ...] = (5, 25, 50, 100)
    interval_s: float = 30.0
    check_every_s: float = 5.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    max_holds: int = 3
    """A step whose interval ended without enough evidence is extended this many intervals, then
    rolled back (a candidate nobody could judge is not promoted)."""
    log_path: Path | None = None


@dataclass
class Outcome:
    promoted: bool
    champion: str
    candidate: str
    decisions: list[dict]
    reasons: list[str]

    def to_dict(self) -> dict:
        return {"outcome": "promoted" if self.promoted else "rolled_back", "champion": self.champion,
                "candidate": self.candidate, "reasons": self.reasons, "decisions": self.decisions}


def check_steps(steps: list[int]) -> tuple[int, ...]:
    if not steps or any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(set(steps)):
        raise UsageError("--steps must be increasing percentages in 1..100", value=",".join(map(str, steps)),
                         origin="--steps", hint="e.g. --steps 5,25,50,100")
    return tuple(steps) if steps[-1] == 100 else (*steps, 100)


def _latest_version(fleet: Fleet, model: str) -> int:
    meta = fleet._json(fleet.urls[0], "GET", f"/v2/models/{model}")
    versions = [int(v) for v in meta.get("versions") or [] if str(v).isdigit()]
    if not versions:
        raise UsageError("cannot tell which version of the champion serves", value=model, origin="--champion",
                         hint="name it: --champion MODEL:VERSION")
    return max(versions)


def champion_of(fleet: Fleet, endpoint: str) -> tuple[str, int]:
    """The current route's first target, with its version resolved when the route names none."""
    first = fleet.route(endpoint)["targets"][0]
    version = first.get("version")
    return first["model"], version if version is not None else _latest_version(fleet, first["model"])


def run(plan: Plan, fleet: Fleet, *, on_decision: Callable[[dict], None] = lambda d: None,
        sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> Outcome:
    route = fleet.route(plan.endpoint)
    champion = plan.champion or champion_of(fleet, plan.endpoint)
    candidate = plan.candidate
    if champion == candidate:
        raise UsageError("the candidate is the champion already", value=f"{candidate[0]}:{candidate[1]}",
                         origin="--candidate", hint="name the new version with --candidate MODEL:VERSION")
    base = {k: route[k] for k in ("sticky", "fallback") if route.get(k)}
    decisions: list[dict] = []
    t = plan.thresholds

    def record(phase: str, weight: int, action: str, reasons: list[str], cand, champ, generation=None) -> None:
        d = {"time": time.time(), "phase": phase, "weight": weight, "action": action, "reasons": reasons,
             "candidate": f"{candidate[0]}:{candidate[1]}", "candidate_figures": cand.to_dict() if cand else None,
             "champion": f"{champion[0]}:{champion[1]}", "champion_figures": champ.to_dict() if champ else None,
             "generation": generation}
        decisions.append(d)
        if plan.log_path is not None:
            with plan.log_path.open("a") as f:
                f.write(json.dumps(d) + "\n")
        on_decision(d)

    def apply(spec: dict) -> int:
        return fleet.set_route(plan.endpoint, {**base, **spec})[0]["generation"]

    def rollback(phase: str, weight: int, reasons: list[str], cand, champ) -> Outcome:
        gen = apply({"targets": [target_dict(*champion, weight=100)]})
        record(phase, weight, "rollback", reasons, cand, champ, gen)
        return Outcome(False, f"{champion[0]}:{champion[1]}", f"{candidate[0]}:{candidate[1]}", decisions, reasons)

    phases: list[tuple[str, int, dict, tuple[str, ...]]] = []
    if plan.shadow_s > 0:
        phases.append(("shadow", 0, {"targets": [target_dict(*champion, weight=100)],
                                     "shadow": target_dict(*candidate, percent=100)}, ("shadow",)))
    compare = 1.0 if t.min_agreement is not None else None
    for w in plan.steps:
        targets = [target_dict(*champion, weight=100 - w), target_dict(*candidate, weight=w)] if w < 100 \
            else [target_dict(*candidate, weight=100)]
        spec = {"targets": targets} if w == 100 or compare is None else {"targets": targets, "compare": compare}
        phases.append((f"step {w}%", w, spec, ("primary",)))

    try:
        for phase, weight, spec, roles in phases:
            outcome = _phase(plan, fleet, phase, weight, spec, roles, candidate, champion, apply, record, rollback,
                             sleep, clock)
            if outcome is not None:
                return outcome
    except (KeyboardInterrupt, ServeKitError):
        # Never leave a half-rolled-out split behind: back to the champion (best effort), then report.
        try:
            apply({"targets": [target_dict(*champion, weight=100)]})
        except ServeKitError:
            pass
        raise
    gen = apply({"targets": [target_dict(*candidate, weight=100)]})
    return Outcome(True, f"{champion[0]}:{champion[1]}", f"{candidate[0]}:{candidate[1]}", decisions,
                   [f"promoted at generation {gen}"])


def _phase(plan, fleet, phase, weight, spec, roles, candidate, champion, apply, record, rollback, sleep, clock):
    """One phase (shadow or a step): None when it passed, else the rollback's Outcome."""
    t = plan.thresholds
    gen = apply(spec)
    start = fleet.scrape()
    started = clock()
    length = plan.shadow_s if phase == "shadow" else plan.interval_s
    deadline = started + length
    holds_allowed = plan.max_holds
    while True:
        sleep(max(0.0, min(plan.check_every_s, deadline - clock())))
        d = analysis.delta(start, fleet.scrape())
        cand = analysis.figures(d, plan.endpoint, *candidate, roles=roles)
        champ = analysis.figures(d, plan.endpoint, *champion, roles=("primary",))
        verdict = judge(t, cand, champ)
        if verdict.action == "rollback":
            return rollback(phase, weight, verdict.reasons, cand, champ)
        if clock() < deadline:
            record(phase, weight, verdict.action, verdict.reasons, cand, champ, gen)
            continue
        if verdict.action == "hold":
            if holds_allowed == 0:
                return rollback(phase, weight, verdict.reasons + ["too little traffic to judge the candidate"],
                                cand, champ)
            holds_allowed -= 1
            deadline = clock() + length
            record(phase, weight, "hold", verdict.reasons + ["step extended"], cand, champ, gen)
            continue
        record(phase, weight, "advance", verdict.reasons, cand, champ, gen)
        return None
