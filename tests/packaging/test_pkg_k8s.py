"""Kubernetes manifests validated against the Kubernetes API's schemas (kubernetes-validate), and the
Triton config.pbtxt parsed back by protobuf."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve_kit.packaging.context import select_versions
from serve_kit.packaging.k8s import PRESTOP_SECONDS, write_manifests
from serve_kit.packaging.package import K8sOptions
from serve_kit.packaging.reference import ImageReference

kubernetes_validate = pytest.importorskip("kubernetes_validate")
K8S_VERSION = "1.30.0"
IMAGE = "127.0.0.1:5000/sk-test/digits@sha256:" + "a" * 64


def _write(repo: Path, folder: Path, **opts) -> dict[str, list[dict]]:
    write_manifests(folder, IMAGE, ImageReference.parse("127.0.0.1:5000/sk-test/digits:1"),
                    select_versions(repo, None), K8sOptions(**opts))
    return {p.relative_to(folder).as_posix(): list(yaml.safe_load_all(p.read_text()))
            for p in sorted(folder.rglob("*.yaml"))}


def test_every_manifest_is_valid_for_the_kubernetes_api(digits_repo, tmp_path):
    docs = _write(digits_repo, tmp_path, namespace="models")
    assert set(docs) == {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "kserve/inferenceservice.yaml"}
    for name, items in docs.items():
        if name.startswith("kserve/"):
            continue
        for doc in items:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any schema error
            assert doc["metadata"]["namespace"] == "models"


def test_deployment_probes_security_and_graceful_exit(digits_repo, tmp_path):
    docs = _write(digits_repo, tmp_path, exit_timeout=30, replicas=3, cpu="2", memory="2Gi")
    (dep,) = docs["deployment.yaml"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == IMAGE
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["resources"]["requests"] == {"cpu": "2", "memory": "2Gi"} and c["resources"]["limits"]["memory"] == "2Gi"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}} in pod["volumes"]
    # SIGTERM comes after preStop; the runtime then drains within --exit-timeout: the grace covers both.
    assert "--exit-timeout=30" in c["args"]
    assert "sleep" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    assert pod["terminationGracePeriodSeconds"] > 30 + PRESTOP_SECONDS
    assert dep["spec"]["replicas"] == 3
    (hpa,) = docs["hpa.yaml"]
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (pdb,) = docs["pdb.yaml"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (svc,) = docs["service.yaml"]
    assert {p["port"] for p in svc["spec"]["ports"]} == {8000, 8001}


def test_kserve_inference_service_structure(digits_repo, tmp_path):
    """KServe's CRD schema is not in kubernetes-validate (core API only): its structure is checked here
    field by field against the v1beta1 InferenceService API."""
    docs = _write(digits_repo, tmp_path, canary_traffic_percent=10)
    (isvc,) = docs["kserve/inferenceservice.yaml"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    pred = isvc["spec"]["predictor"]
    assert set(pred) <= {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "canaryTrafficPercent",
                         "containers", "volumes", "terminationGracePeriodSeconds"}
    assert pred["canaryTrafficPercent"] == 10 and pred["scaleMetric"] == "cpu"
    (c,) = pred["containers"]
    assert c["name"] == "kserve-container" and c["image"] == IMAGE
    assert c["ports"] == [{"containerPort": 8000, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    assert isvc["metadata"]["annotations"]["serve-kit/protocol"] == "v2"
    # The containers, volumes and probes are core PodSpec pieces: validate them as a Pod.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": pred["containers"], "volumes": pred["volumes"]}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert "canaryTrafficPercent" not in _write(digits_repo, tmp_path / "b")["kserve/inferenceservice.yaml"][0][
        "spec"]["predictor"]


def test_engine_build_wrote_manifests_for_the_pushed_digest(engine_build):
    result, out = engine_build
    (dep,) = yaml.safe_load_all((out / "k8s" / "deployment.yaml").read_text())
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == result["push"]["pinned"]


def test_triton_config_pbtxt_parses_back(digits_repo):
    from google.protobuf import text_format

    from serve_kit.packaging.triton import config_pbtxt
    from serve_kit.repository import Repository
    from serve_kit.runtime.proto import model_config_pb2

    config = Repository(digits_repo).config("digits")
    msg = text_format.Parse(config_pbtxt(config), model_config_pb2.ModelConfig())
    assert msg.name == "digits" and msg.platform == "onnxruntime_onnx" and msg.backend == "onnxruntime"
    assert msg.max_batch_size == config.max_batch_size
    assert [i.name for i in msg.input] == ["input"] and list(msg.input[0].dims) == [1, 8, 8]
    assert msg.input[0].data_type == model_config_pb2.TYPE_FP32
    assert list(msg.output[0].dims) == [10]
    assert list(msg.dynamic_batching.preferred_batch_size) == config.dynamic_batching.preferred_batch_size
    assert msg.version_policy.latest.num_versions == 1
