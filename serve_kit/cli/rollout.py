"""`serve-kit route ...` (look at and change a running server's routes) and `serve-kit rollout`
(a gated canary: shadow, weight steps, automatic rollback)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import EXIT_GATE, InputError, UsageError
from . import app
from ._common import emit_json, err, out, state

route_app = typer.Typer(help="Show or change the routes of a running server (the route management API).",
                        no_args_is_help=True)
app.add_typer(route_app, name="route")

_TOKEN = typer.Option(None, "--token", envvar="SERVE_KIT_MANAGEMENT_TOKEN",
                      help="Management token (default: $SERVE_KIT_MANAGEMENT_TOKEN).")


def _fleet(url: str, extra: list[str] | None, token: str | None):
    from ..rollout.driver import Fleet

    return Fleet([url, *(extra or [])], token)


def _describe(state_doc: dict) -> str:
    parts = [", ".join(f"{t['model']}:{t.get('version', 'latest')} {t.get('share', 0) * 100:g}%"
                       for t in state_doc.get("targets", []))]
    if state_doc.get("shadow"):
        s = state_doc["shadow"]
        parts.append(f"shadow {s['model']}:{s.get('version', 'latest')} {s.get('percent', 100):g}%")
    if state_doc.get("sticky"):
        parts.append("sticky " + ", ".join(f"{k}={v}" for k, v in state_doc["sticky"].items()))
    return "; ".join(parts)


def _render_routes(routes: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="routes")
    for col in ("endpoint", "targets", "generation", "source"):
        table.add_column(col)
    for r in routes:
        table.add_row(r["endpoint"], _describe(r), str(r.get("generation", "")), str(r.get("source", "")))
    out.print(table)


def _done(states: list[dict]) -> None:
    if state.json:
        emit_json(states[0] if len(states) == 1 else states)
    else:
        _render_routes(states)


@route_app.command("show")
def route_show(url: str = typer.Argument(..., help="Server URL, e.g. http://127.0.0.1:8000."),
               endpoint: Optional[str] = typer.Argument(None, help="One endpoint (default: all).")) -> None:
    """Show the routes (or one endpoint's route)."""
    fleet = _fleet(url, None, None)
    routes = [fleet.route(endpoint)] if endpoint else fleet.routes()
    if state.json:
        emit_json(routes[0] if endpoint else {"routes": routes})
    else:
        _render_routes(routes)


@route_app.command("set")
def route_set(url: str = typer.Argument(...), endpoint: str = typer.Argument(...),
              file: Path = typer.Option(..., "--file", "-f", help="A route as YAML or JSON (contract fields)."),
              urls: list[str] = typer.Option([], "--url", help="More replicas to change the same way (repeat)."),
              token: Optional[str] = _TOKEN) -> None:
    """Replace an endpoint's route with the one in a file."""
    import yaml

    try:
        doc = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read the route: {e}", value=str(file), origin="--file") from None
    if not isinstance(doc, dict):
        raise InputError("a route file holds one mapping (targets, sticky, shadow, ...)", value=str(file), origin="--file")
    if doc.get("endpoint", endpoint) != endpoint:
        raise UsageError(f"the route file is for endpoint {doc['endpoint']!r}, not {endpoint!r}", value=str(file),
                         origin="--file", hint="drop `endpoint` from the file or name the same endpoint")
    _done(_fleet(url, urls, token).set_route(endpoint, doc))


def _weighted(text: str) -> dict:
    from ..rollout.driver import parse_target, target_dict

    target, eq, weight = text.rpartition("=")
    if not eq or not weight.replace(".", "", 1).isdigit():
        raise UsageError("a split target is MODEL:VERSION=WEIGHT", value=text, origin="route split", hint="digits:1=95")
    return target_dict(*parse_target(target, "route split"), weight=float(weight))


@route_app.command("split")
def route_split(url: str = typer.Argument(...), endpoint: str = typer.Argument(...),
                targets: list[str] = typer.Argument(..., help="MODEL:VERSION=WEIGHT, e.g. digits:1=95 digits:2=5."),
                sticky_header: Optional[str] = typer.Option(None, "--sticky-header", help="Assign by this header's value."),
                urls: list[str] = typer.Option([], "--url", help="More replicas (repeat)."),
                token: Optional[str] = _TOKEN) -> None:
    """Split an endpoint's traffic by weight."""
    spec: dict = {"targets": [_weighted(t) for t in targets]}
    if sticky_header:
        spec["sticky"] = {"header": sticky_header}
    _done(_fleet(url, urls, token).set_route(endpoint, spec))


@route_app.command("switch")
def route_switch(url: str = typer.Argument(...), endpoint: str = typer.Argument(...),
                 target: str = typer.Argument(..., help="MODEL:VERSION that takes all the traffic."),
                 urls: list[str] = typer.Option([], "--url", help="More replicas (repeat)."),
                 token: Optional[str] = _TOKEN) -> None:
    """Blue-green: send all of an endpoint's traffic to one version."""
    from ..rollout.driver import parse_target, target_dict

    _done(_fleet(url, urls, token).set_route(endpoint, {"targets": [target_dict(*parse_target(target), weight=100)]}))


@route_app.command("shadow")
def route_shadow(url: str = typer.Argument(...), endpoint: str = typer.Argument(...),
                 target: str = typer.Argument(..., help="MODEL:VERSION that gets a copy (answers discarded)."),
                 percent: float = typer.Option(100.0, "--percent", min=0, max=100, help="Share of requests mirrored."),
                 urls: list[str] = typer.Option([], "--url", help="More replicas (repeat)."),
                 token: Optional[str] = _TOKEN) -> None:
    """Mirror a share of an endpoint's requests to a shadow version, keeping the rest of the route."""
    from ..rollout.driver import parse_target, target_dict

    fleet = _fleet(url, urls, token)
    current = fleet.route(endpoint)
    spec = {k: current[k] for k in ("targets", "sticky", "fallback", "compare") if current.get(k)}
    spec["shadow"] = target_dict(*parse_target(target), percent=percent)
    _done(fleet.set_route(endpoint, spec))


@route_app.command("clear")
def route_clear(url: str = typer.Argument(...), endpoint: str = typer.Argument(...),
                urls: list[str] = typer.Option([], "--url", help="More replicas (repeat)."),
                token: Optional[str] = _TOKEN) -> None:
    """Drop the API's route: back to the config.yaml / routes.yaml route, or the latest version."""
    _done(_fleet(url, urls, token).clear_route(endpoint))


def _seconds(text: str, origin: str) -> float:
    units = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * units[suffix]
    if text.replace(".", "", 1).isdigit():
        return float(text)
    raise UsageError("a duration is a number with s, m, h or ms", value=text, origin=origin, hint="e.g. 30s, 5m")


@app.command()
def rollout(
    url: str = typer.Argument(..., help="Server URL (add replicas with --url)."),
    urls: list[str] = typer.Option([], "--url", help="More replicas: each gets every change; metrics are summed."),
    endpoint: str = typer.Option(..., "--endpoint", help="The endpoint clients call."),
    candidate: str = typer.Option(..., "--candidate", help="MODEL:VERSION to roll out."),
    champion: Optional[str] = typer.Option(None, "--champion", help="MODEL:VERSION (default: the route's first target)."),
    shadow: str = typer.Option("0s", "--shadow", help="Shadow phase first (e.g. 30s; 0 = none)."),
    steps: str = typer.Option("5,25,50,100", "--steps", help="Candidate weights in %, in order."),
    interval: str = typer.Option("30s", "--interval", help="How long each step is held."),
    check_every: str = typer.Option("5s", "--check-every", help="How often each step is checked."),
    max_error_rate: float = typer.Option(0.01, "--max-error-rate", min=0, max=1),
    max_p99_ratio: float = typer.Option(1.5, "--max-p99-ratio", min=0),
    min_agreement: Optional[float] = typer.Option(None, "--min-agreement", min=0, max=1),
    min_requests: int = typer.Option(50, "--min-requests", min=1),
    mlflow_uri: Optional[str] = typer.Option(None, "--mlflow-uri"),
    mlflow_model: Optional[str] = typer.Option(None, "--mlflow-model"),
    mlflow_version: Optional[int] = typer.Option(None, "--mlflow-version"),
    log: Optional[Path] = typer.Option(None, "--log", help="Append every decision here (JSON lines)."),
    emit: Optional[str] = typer.Option(None, "--emit", help="Write the policy for istio or flagger instead of running it."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for --emit's manifests."),
    service: Optional[str] = typer.Option(None, "--service", help="Kubernetes Service/Deployment name (--emit; default: the endpoint)."),
    namespace: str = typer.Option("default", "--namespace", help="Kubernetes namespace (--emit)."),
    token: Optional[str] = _TOKEN,
) -> None:
    """Roll a candidate version out step by step; roll back at the first failed check.

    Exit codes: 0 promoted, 3 rolled back (a gate failed), 1 error, 2 usage."""
    from ..rollout import engine
    from ..rollout.decision import Thresholds
    from ..rollout.driver import parse_target

    cand = parse_target(candidate, "--candidate")
    champ = parse_target(champion, "--champion") if champion else None
    if cand[1] is None or (champ is not None and champ[1] is None):
        raise UsageError("name the version: MODEL:VERSION", value=champion if champ else candidate,
                         origin="--champion" if champ else "--candidate")
    if (mlflow_model is None) != (mlflow_version is None):
        raise UsageError("--mlflow-model and --mlflow-version go together", origin="--mlflow-model")
    try:
        step_list = [int(s) for s in steps.split(",") if s.strip()]
    except ValueError:
        raise UsageError("--steps must be integers", value=steps, origin="--steps") from None
    plan = engine.Plan(endpoint=endpoint, candidate=cand, champion=champ, shadow_s=_seconds(shadow, "--shadow"),
                       steps=engine.check_steps(step_list), interval_s=_seconds(interval, "--interval"),
                       check_every_s=_seconds(check_every, "--check-every"),
                       thresholds=Thresholds(max_error_rate, max_p99_ratio, min_agreement, min_requests),
                       log_path=log)
    fleet = _fleet(url, urls, token)
    if emit is not None:
        from ..rollout import emit as emitter

        if emit not in ("istio", "flagger") or out_dir is None:
            raise UsageError("--emit takes istio or flagger, with --out DIR", value=emit, origin="--emit")
        champ = champ or engine.champion_of(fleet, endpoint)
        paths = emitter.write(emit, plan, champ, out_dir, service=service or endpoint, namespace=namespace)
        if state.json:
            emit_json({"emitted": [str(p) for p in paths]})
        else:
            out.print("wrote " + ", ".join(map(str, paths)))
        return

    def show(d: dict) -> None:
        c = d["candidate_figures"] or {}
        p99 = f"{c['p99_s'] * 1e3:.1f} ms" if c.get("p99_s") is not None else "-"
        err.print(f"{d['phase']:>10}  {d['action']:<8} n={c.get('requests', 0)} err={c.get('error_rate')} "
                  f"p99={p99} agree={c.get('agreement')}  {'; '.join(d['reasons'])}", highlight=False)

    if mlflow_model:  # fail before any traffic moves, not after a successful rollout
        from ..packaging.mlflow_registry import check_reachable, promote, resolve_tracking_uri

        uri = resolve_tracking_uri(mlflow_uri)
        check_reachable(uri)
    result = engine.run(plan, fleet, on_decision=(lambda d: None) if state.json else show)
    doc = result.to_dict()
    if result.promoted and mlflow_model:
        doc["mlflow"] = promote(uri, mlflow_model, mlflow_version, "champion")
    if state.json:
        emit_json(doc)
    else:
        _render_decisions(result.decisions)
        colour = "green" if result.promoted else "red"
        out.print(f"[{colour}]{doc['outcome']}[/]: {result.candidate} ({'; '.join(result.reasons)})")
    if not result.promoted:
        raise typer.Exit(EXIT_GATE)


def _render_decisions(decisions: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="rollout decisions")
    for col in ("phase", "action", "requests", "error rate", "p99 ms", "champion p99 ms", "agreement", "reasons"):
        table.add_column(col)
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    for d in decisions:
        c, k = d["candidate_figures"] or {}, d["champion_figures"] or {}
        table.add_row(d["phase"], d["action"], str(c.get("requests", 0)), fmt(c.get("error_rate"), "{:.4f}"),
                      fmt(c.get("p99_s") and c["p99_s"] * 1e3, "{:.1f}"), fmt(k.get("p99_s") and k["p99_s"] * 1e3, "{:.1f}"),
                      fmt(c.get("agreement"), "{:.4f}"), "; ".join(d["reasons"]))
    out.print(table)
