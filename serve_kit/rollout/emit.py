"""`serve-kit rollout --emit istio|flagger`: the same policy written for an existing engine.

istio: a DestinationRule (a subset per model version, pods labelled `version`) and a VirtualService
holding the first step's weights, with the candidate mirrored during the shadow phase (Istio's
`mirror` + `mirrorPercentage`). flagger: a Canary whose analysis mirrors the steps (`stepWeights`,
`maxWeight`, `interval`, `threshold: 1` = roll back at the first failed check) and MetricTemplates
whose PromQL reads serve-kit's own metrics (contract names) for the candidate's error rate, its p99
relative to the champion's (both from the per-version series, which every server exports whether
or not it routes) and its live agreement (which needs an in-pod serve-kit shadow or compare route:
a mesh mirror discards the candidate's answers, so there is nothing to compare)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def _subset(version: int) -> str:
    return f"v{version}"


def istio(plan, champion: tuple[str, int], *, service: str, namespace: str = "default", port: int = 8000) -> list[dict]:
    cand = plan.candidate
    host = f"{service}.{namespace}.svc.cluster.local"
    first = plan.steps[0]
    rule = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": service, "namespace": namespace},
            "spec": {"host": host, "subsets": [{"name": _subset(v), "labels": {"version": str(v)}}
                                               for v in dict.fromkeys((champion[1], cand[1]))]}}
    route: dict[str, Any] = {"route": [
        {"destination": {"host": host, "subset": _subset(champion[1]), "port": {"number": port}}, "weight": 100 - first},
        {"destination": {"host": host, "subset": _subset(cand[1]), "port": {"number": port}}, "weight": first}]}
    if plan.shadow_s > 0:  # shadow first: all traffic on the champion, every request mirrored
        route["route"][0]["weight"], route["route"][1]["weight"] = 100, 0
        route["mirror"] = {"host": host, "subset": _subset(cand[1]), "port": {"number": port}}
        route["mirrorPercentage"] = {"value": 100.0}
    service_doc = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                   "metadata": {"name": service, "namespace": namespace},
                   "spec": {"hosts": [host], "http": [route]}}
    return [rule, service_doc]


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m" if seconds >= 60 and seconds % 60 == 0 else f"{max(1, round(seconds))}s"


def flagger(plan, champion: tuple[str, int], *, service: str, namespace: str = "default", port: int = 8000,
            prometheus: str = "http://prometheus.istio-system:9090") -> list[dict]:
    model, version = plan.candidate
    # Under a mesh each Deployment serves its own version with no serve-kit route in between, so
    # error rate and latency read the per-version series every server exports; only the live
    # agreement needs the pods to compare in-process (a serve-kit shadow/compare route).
    ver = f'model="{model}",version="{version}"'
    champ_ver = f'model="{champion[0]}",version="{champion[1]}"'
    sel = f'endpoint="{plan.endpoint}",model="{model}",version="{version}"'
    rng = "{{ interval }}"
    queries = {
        "serve-kit-error-rate": (
            f'sum(rate(serve_kit_requests_total{{{ver},status=~"500|503|504"}}[{rng}])) / '
            f'sum(rate(serve_kit_requests_total{{{ver}}}[{rng}]))', {"max": plan.thresholds.max_error_rate}),
        "serve-kit-p99-ratio": (
            f'histogram_quantile(0.99, sum by (le) (rate(serve_kit_compute_duration_seconds_bucket{{{ver}}}[{rng}]))) / '
            f'histogram_quantile(0.99, sum by (le) (rate(serve_kit_compute_duration_seconds_bucket{{{champ_ver}}}[{rng}])))',
            {"max": plan.thresholds.max_p99_ratio}),
    }
    if plan.thresholds.min_agreement is not None:
        queries["serve-kit-agreement"] = (
            f"sum(rate(serve_kit_shadow_agreement_sum{{{sel}}}[{rng}])) / sum(rate(serve_kit_shadow_agreement_count{{{sel}}}[{rng}]))",
            {"min": plan.thresholds.min_agreement})
    templates = [{"apiVersion": "flagger.app/v1beta1", "kind": "MetricTemplate",
                  "metadata": {"name": name, "namespace": namespace},
                  "spec": {"provider": {"type": "prometheus", "address": prometheus}, "query": query}}
                 for name, (query, _) in queries.items()]
    interval = _duration(plan.interval_s)
    steps = [s for s in plan.steps if s < 100]
    canary = {"apiVersion": "flagger.app/v1beta1", "kind": "Canary",
              "metadata": {"name": service, "namespace": namespace},
              "spec": {"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": service},
                       "service": {"port": port},
                       "analysis": {"interval": interval, "threshold": 1,
                                    "maxWeight": max(steps) if steps else 100,
                                    "stepWeights": steps or [100],
                                    "metrics": [{"name": name, "templateRef": {"name": name, "namespace": namespace},
                                                 "thresholdRange": limit, "interval": interval}
                                                for name, (_, limit) in queries.items()]}}}
    return [canary, *templates]


def write(kind: str, plan, champion: tuple[str, int], folder: Path, *, service: str, namespace: str) -> list[Path]:
    docs = (istio if kind == "istio" else flagger)(plan, champion, service=service, namespace=namespace)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-{service}.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return [path]
