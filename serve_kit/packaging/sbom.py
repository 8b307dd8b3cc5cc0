"""A CycloneDX 1.5 JSON SBOM of an image: the base image, every wheel installed in it (name, version,
purl, sha256 of the wheel file, license) and every model version (sha256 of each file from its
manifest, backend, variant, precision).

Written by hand rather than with cyclonedx-python-lib: the document is small, and it must be
byte-for-byte reproducible (it lies inside the image whose digest must not change between two builds
of the same inputs), so the serial number is derived from the content and the timestamp is the
build's epoch.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from .. import __version__
from ..repository import VersionInfo
from .wheels import WheelInfo

SPEC_VERSION = "1.5"


def _license(w: WheelInfo) -> list[dict] | None:
    if w.license_expression:
        return [{"expression": w.license_expression}]
    if w.license:
        return [{"license": {"name": w.license}}]
    return None


def build_sbom(*, image_name: str, image_version: str, base_name: str, base_digest: str | None,
               wheels: list[WheelInfo], versions: list[VersionInfo], created: str,
               copied: dict[tuple[str, int], dict[str, str]] | None = None) -> dict[str, Any]:
    """The SBOM. `wheels` are hashed from the files in the build context; `copied` gives the sha256
    of every model file as copied into the context (context.copy_models), which the model
    components list (without it, the manifests' hashes)."""
    components: list[dict[str, Any]] = []
    base = {"type": "container", "bom-ref": "base-image", "name": base_name}
    if base_digest:
        base["version"] = base_digest
        base["hashes"] = [{"alg": "SHA-256", "content": base_digest.split(":", 1)[1]}]
    components.append(base)
    for w in sorted(wheels, key=lambda x: x.name.lower()):
        purl = f"pkg:pypi/{w.name.lower().replace('_', '-')}@{w.version}"
        c: dict[str, Any] = {"type": "library", "bom-ref": purl, "name": w.name, "version": w.version, "purl": purl,
                             "hashes": [{"alg": "SHA-256", "content": w.sha256}],
                             "properties": [{"name": "serve-kit:wheel", "value": w.path.name}]}
        if w.summary:
            c["description"] = w.summary
        lic = _license(w)
        if lic:
            c["licenses"] = lic
        if w.homepage:
            c["externalReferences"] = [{"type": "website", "url": w.homepage}]
        components.append(c)
    for v in versions:
        m = v.manifest or {}
        files = m.get("files", {})
        got = (copied or {}).get((v.model, v.version))
        if got is not None:
            files = {rel: {"sha256": digest} for rel, digest in got.items() if rel != "manifest.json"}
        model_file = m.get("model_file")
        c = {"type": "machine-learning-model", "bom-ref": f"model:{v.model}/{v.version}", "name": v.model,
             "version": str(v.version),
             "properties": [{"name": f"serve-kit:{k}", "value": str(m[k])}
                            for k in ("backend", "variant", "precision", "created", "format") if m.get(k) is not None]}
        if model_file in files:
            c["hashes"] = [{"alg": "SHA-256", "content": files[model_file]["sha256"]}]
        c["properties"] += [{"name": f"serve-kit:file:{rel}:sha256", "value": meta.get("sha256", "")}
                            for rel, meta in sorted(files.items())]
        c["properties"] += [{"name": "serve-kit:path", "value": f"/models/{v.model}/{v.version}"}]
        components.append(c)
    doc: dict[str, Any] = {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "version": 1,
        "metadata": {
            "timestamp": created,
            "tools": {"components": [{"type": "application", "name": "serve-kit", "version": __version__}]},
            "component": {"type": "container", "bom-ref": "image", "name": image_name, "version": image_version},
        },
        "components": components,
        "dependencies": [{"ref": "image", "dependsOn": [c["bom-ref"] for c in components]}],
    }
    # A serial number from the content: the same image gets the same SBOM, bytes included.
    content = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    doc["serialNumber"] = "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, "serve-kit-sbom:" + content))
    return doc


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"
