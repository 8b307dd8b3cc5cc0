"""Kubernetes manifests for a packaged image.

    <dir>/deployment.yaml, service.yaml, hpa.yaml, pdb.yaml   `kubectl apply -f <dir>`
    <dir>/kserve/inferenceservice.yaml                         the KServe alternative (apply one or the other)

Why these settings: the pod is ready only when the runtime is (`/v2/health/ready`: every model loaded
and warmed up) and restarted only when the process is stuck (`/v2/health/live`); on termination a
preStop pause lets endpoints drop the pod before SIGTERM, then the runtime drains in-flight requests
within its --exit-timeout, and terminationGracePeriodSeconds covers both with a margin, so a rollout
or scale-down loses no request. The root filesystem is read-only (the runtime writes nothing; /tmp
is an emptyDir for Python and ONNX Runtime scratch), the user is the image's uid 10001.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from .context import ENTRYPOINT, GRPC_PORT, HTTP_PORT, USER
from .layers import VENV

PRESTOP_SECONDS = 5
GRACE_MARGIN_SECONDS = 10


def _name(text: str) -> str:
    """A DNS-1123 label from an image repository name."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.split("/")[-1].lower()).strip("-")
    return (name or "model")[:53].rstrip("-")


def manifests(image: str, tag, selection, opts) -> dict[str, list[dict[str, Any]]]:
    """{file name: documents}."""
    name = _name(tag.repository)
    uid = int(USER.split(":")[0])
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "inference",
              "app.kubernetes.io/managed-by": "serve-kit"}
    selector = {"app.kubernetes.io/name": name}
    meta = {"name": name, "labels": labels, **({"namespace": opts.namespace} if opts.namespace else {})}
    grace = math.ceil(PRESTOP_SECONDS + opts.exit_timeout + GRACE_MARGIN_SECONDS)
    probe = lambda path, period, failures: {  # noqa: E731
        "httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 2,
        "failureThreshold": failures}
    container = {
        "name": "serve-kit",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": [f"--exit-timeout={opts.exit_timeout:g}"],
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": opts.cpu, "memory": opts.memory},
                      "limits": {"cpu": opts.cpu, "memory": opts.memory}},
        # Model loading and warm-up can take a while: the startup probe holds liveness off meanwhile.
        "startupProbe": probe("/v2/health/live", 2, 60),
        "readinessProbe": probe("/v2/health/ready", 5, 2),
        "livenessProbe": probe("/v2/health/live", 10, 3),
        "lifecycle": {"preStop": {"exec": {"command": [f"{VENV}/bin/python", "-c",
                                                       f"import time; time.sleep({PRESTOP_SECONDS})"]}}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(HTTP_PORT),
                       "prometheus.io/path": "/metrics", "serve-kit/models": selection.label}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {
            "replicas": opts.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels, "annotations": pod_annotations},
                "spec": {
                    "terminationGracePeriodSeconds": grace,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "automountServiceAccountToken": False,
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": meta,
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                           {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                            "appProtocol": "kubernetes.io/h2c"}]},
    }
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": opts.replicas, "maxReplicas": max(opts.max_replicas, opts.replicas),
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                "type": "Utilization", "averageUtilization": opts.target_cpu_percent}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300,
                                       "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}},
        },
    }
    pdb = {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta,
        "spec": {"selector": {"matchLabels": selector},
                 **({"minAvailable": 1} if opts.replicas > 1 else {"maxUnavailable": 1})},
    }
    predictor: dict[str, Any] = {
        "minReplicas": opts.replicas, "maxReplicas": max(opts.max_replicas, opts.replicas),
        "scaleMetric": "cpu", "scaleTarget": opts.target_cpu_percent,
        "containers": [{
            "name": "kserve-container",
            "image": image,
            "args": container["args"],
            # KServe routes to one port; the runtime's HTTP port speaks the v2 protocol.
            "ports": [{"containerPort": HTTP_PORT, "protocol": "TCP"}],
            "resources": container["resources"],
            "readinessProbe": container["readinessProbe"] | {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT}},
            "livenessProbe": container["livenessProbe"] | {"httpGet": {"path": "/v2/health/live", "port": HTTP_PORT}},
            "securityContext": container["securityContext"],
            "volumeMounts": container["volumeMounts"],
        }],
        "volumes": deployment["spec"]["template"]["spec"]["volumes"],
        "terminationGracePeriodSeconds": grace,
    }
    if opts.canary_traffic_percent is not None:
        predictor["canaryTrafficPercent"] = opts.canary_traffic_percent
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {**meta, "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment",
                                             "serve-kit/protocol": "v2", "serve-kit/models": selection.label}},
        "spec": {"predictor": predictor},
    }
    return {"deployment.yaml": [deployment], "service.yaml": [service], "hpa.yaml": [hpa], "pdb.yaml": [pdb],
            "kserve/inferenceservice.yaml": [isvc]}


def write_manifests(folder: Path, image: str, tag, selection, opts) -> dict[str, Any]:
    folder = Path(folder)
    written = []
    for rel, docs in manifests(image, tag, selection, opts).items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Generated by serve-kit package; image " + image + "\n"
                        + yaml.safe_dump_all(docs, sort_keys=False))
        written.append(str(path))
    return {"folder": str(folder), "files": written, "image": image, "entrypoint": ENTRYPOINT}
