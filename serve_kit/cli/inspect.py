"""`serve-kit inspect`: show a model repository and verify every file against its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import RepositoryError
from ..repository import Repository
from . import app
from ._common import emit_json, human_size, out, state


@app.command()
def inspect(
    repository: Path = typer.Argument(..., help="Model repository folder."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Only this model."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file's sha256 against the manifest."),
) -> None:
    """Show models, versions, inputs/outputs and sizes; verify hashes (exit 1 on any mismatch)."""
    repo = Repository(repository)
    if not repo.exists():
        raise RepositoryError("repository folder not found", value=str(repository), origin="REPOSITORY",
                              hint="create one with `serve-kit optimize --recipe digits-cnn -r PATH`")
    models = [model] if model else repo.models()
    if not models:
        raise RepositoryError("no models in repository (no <model>/config.yaml)", value=str(repository),
                              origin="REPOSITORY")
    report, bad = [], []
    for m in models:
        cfg = repo.config(m)
        versions = []
        for info in repo.versions(m):
            problems = repo.verify_version(info) if verify else list(info.problems)
            if problems:
                bad.append(f"{m}/{info.version}: " + "; ".join(problems))
            # A manifest is repository input: any field may hold any JSON (shown, never trusted).
            man = info.manifest or {}
            val = _obj(man.get("validation"))
            errors = [_obj(e) for e in _obj(val.get("errors")).values()]
            cosines = [e["cosine_mean"] for e in errors if isinstance(e.get("cosine_mean"), (int, float))]
            versions.append({
                "version": info.version, "variant": _shown(man.get("variant")), "backend": _shown(man.get("backend")),
                "model_file": _shown(man.get("model_file")), "size_bytes": info.size_bytes,
                "created": _shown(man.get("created")),
                "metric": val.get("metric") if isinstance(val.get("metric"), (int, float)) else None,
                "cosine": min(cosines, default=None),
                "verified": (not problems) if verify else None, "problems": problems,
                "calibration_synthetic": _obj(man.get("calibration")).get("synthetic"),
            })
        report.append({"name": m, "backend": cfg.backend, "max_batch_size": cfg.max_batch_size,
                       "inputs": [t.describe() for t in cfg.inputs], "outputs": [t.describe() for t in cfg.outputs],
                       "dynamic_batching": cfg.dynamic_batching is not None, "versions": versions})
    if state.json:
        emit_json({"repository": str(repository), "models": report, "verified": not bad if verify else None})
    else:
        for m in report:
            out.print(f"[bold]{m['name']}[/]  backend={m['backend']}  max_batch_size={m['max_batch_size']}  "
                      f"dynamic_batching={'on' if m['dynamic_batching'] else 'off'}")
            out.print(f"  inputs:  {escape(', '.join(m['inputs']))}")
            out.print(f"  outputs: {escape(', '.join(m['outputs']))}")
            t = Table()
            for col in ("version", "variant", "backend", "file", "size", "metric", "cosine", "created", "verified"):
                t.add_column(col)
            for v in m["versions"]:
                ver = "-" if v["verified"] is None else ("[green]ok[/]" if v["verified"] else "[red]FAILED[/]")
                t.add_row(str(v["version"]), escape(str(v["variant"])), escape(str(v["backend"])),
                          escape(str(v["model_file"])),
                          human_size(v["size_bytes"]), "-" if v["metric"] is None else f"{v['metric']:.2f}",
                          "-" if v["cosine"] is None else f"{v['cosine']:.6f}", escape(str(v["created"])), ver)
            out.print(t)
    if bad:
        raise RepositoryError("verification failed: " + " | ".join(bad), origin=str(repository),
                              hint="a file changed after it was written; re-run `serve-kit optimize` to write a new version")


def _obj(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _shown(value: object) -> str | None:
    """A manifest string as shown: at most 200 characters, anything else as its repr."""
    if value is None:
        return None
    text = value if isinstance(value, str) else repr(value)
    return text[:200] + "..." if len(text) > 200 else text
