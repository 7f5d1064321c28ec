"""The Kubernetes manifests: each overlay builds with ``kubectl kustomize`` and every object
validates against its schema: the Kubernetes API's (kubernetes-validate, strict: unknown fields
are errors) or, for KEDA and Prometheus-operator resources, the CRD schemas vendored in
deploy/k8s/schemas. Then the properties operations rely on are checked on the built objects.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml
from support import REPO

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ["dev", "prod"]
#: The Kubernetes API version validated against (kubernetes-validate carries the schemas).
KUBERNETES_VERSION = "1.30.0"
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_triggerauthentication_v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrule_v1.json",
}


def crd_validator(key: tuple[str, str]) -> jsonschema.Draft7Validator:
    """A validator for a CRD's openAPIV3Schema. The schema is not checked against Draft 7's
    metaschema: some of its patterns use Go regexp syntax (``(?i)``), which Python's ``re``
    accepts but the metaschema's ECMA-262 ``regex`` format does not."""
    return jsonschema.Draft7Validator(strict(json.loads((K8S / "schemas" / CRD_SCHEMAS[key]).read_text())))


def strict(schema):
    """Unknown fields become errors, as with the API server's strict field validation (a CRD
    schema is structural: fields it does not declare are pruned silently, a typo included)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def build(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("`kubectl` is not installed (.ci/run installs the Debian package kubernetes-client when missing)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request) -> list[dict]:
    return build(request.param)


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str) -> dict:
    [obj] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def test_every_object_validates_against_its_schema(objects):
    checked = set()
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if key in CRD_SCHEMAS:
            crd_validator(key).validate(obj)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        checked.add(obj["kind"])
    assert {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ScaledObject",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
    } <= checked


def test_the_validators_do_reject_a_broken_object(objects):
    """The checks above would catch a mistake (they are not vacuous)."""
    deployment = json.loads(json.dumps(one(objects, "Deployment", "triton")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    scaled = json.loads(json.dumps(one(objects, "ScaledObject", "moodstream-worker")))
    validator = crd_validator(("keda.sh/v1alpha1", "ScaledObject"))
    validator.validate(scaled)
    for field, value in (("maxReplicaCount", "many"), ("maxReplicas", 3)):
        broken = json.loads(json.dumps(scaled))
        broken["spec"][field] = value
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(broken)


def test_everything_lives_in_the_overlay_namespace(objects):
    [namespace] = of_kind(objects, "Namespace")
    name = namespace["metadata"]["name"]
    assert all(o["metadata"].get("namespace") == name for o in objects if o["kind"] != "Namespace")


def test_containers_run_non_root_read_only_without_capabilities(objects):
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "limits" in container["resources"] and "requests" in container["resources"]


def test_triton_gets_a_gpu_and_health_probes_that_allow_model_loading(objects):
    triton = one(objects, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert any(a.startswith("--model-repository=") for a in triton["args"])
    service_ports = {p["name"] for p in one(objects, "Service", "triton")["spec"]["ports"]}
    assert service_ports == {"http", "grpc", "metrics"}


def test_worker_drains_and_keeps_its_group_membership(objects):
    pod = one(objects, "Deployment", "moodstream-worker")["spec"]["template"]["spec"]
    # Longer than the longest batch (see the manifest's comment); Kubernetes' default is 30 s.
    assert pod["terminationGracePeriodSeconds"] >= 300
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MOODSTREAM_KAFKA_GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Secret values are referenced, never written into the manifests.
    assert env["MOODSTREAM_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "moodstream-kafka"
    assert not of_kind(objects, "Secret")
    config = one_generated(objects, "moodstream-worker")
    assert not any("PASSWORD" in key or "SECRET" in key for key in config["data"])


def test_worker_hands_patches_over_in_a_memory_backed_dev_shm(objects):
    from pipeline.worker.handoff import MAX_SHARED_BYTES

    pod = one(objects, "Deployment", "moodstream-worker")["spec"]["template"]["spec"]
    [worker] = pod["containers"]
    [shm] = [v for v in pod["volumes"] if v["name"] == "shm"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in worker["volumeMounts"]
    assert shm["emptyDir"]["medium"] == "Memory"
    # Each decoding process may leave one block while it starts the next track's.
    decode_workers = int(one_generated(objects, "moodstream-worker")["data"]["MOODSTREAM_DECODE_WORKERS"])
    assert _bytes(shm["emptyDir"]["sizeLimit"]) >= 2 * decode_workers * MAX_SHARED_BYTES


def one_generated(objects: list[dict], prefix: str) -> dict:
    [config] = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].startswith(prefix + "-")]
    return config


def test_keda_scales_the_worker_on_lag_within_the_partition_count(objects):
    scaled = one(objects, "ScaledObject", "moodstream-worker")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "moodstream-worker"
    assert spec["maxReplicaCount"] <= int(scaled["metadata"]["annotations"]["moodstream.io/input-partitions"])
    [trigger] = spec["triggers"]
    config = one_generated(objects, "moodstream-worker")["data"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == config["MOODSTREAM_INPUT_TOPIC"]
    assert trigger["metadata"]["consumerGroup"] == config["MOODSTREAM_CONSUMER_GROUP"]
    assert trigger["metadata"]["bootstrapServers"] == config["MOODSTREAM_KAFKA_BOOTSTRAP"]
    if config["MOODSTREAM_KAFKA_SECURITY_PROTOCOL"].startswith("SASL"):
        auth = one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} >= {"username", "password", "sasl"}


def test_disruption_budgets_and_network_policies_cover_every_workload(objects):
    for app in ("triton", "moodstream-worker", "moodstream-api"):
        budget = one(objects, "PodDisruptionBudget", app)
        assert budget["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": app}
        policy = one(objects, "NetworkPolicy", app)
        assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": app}
    deny = one(objects, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    grpc_from = one(objects, "NetworkPolicy", "triton")["spec"]["ingress"][0]["from"]
    assert grpc_from == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": name}}}
        for name in ("moodstream-worker", "moodstream-api")
    ]


def test_scrape_jobs_and_rules_match_the_alerts_file(objects):
    # The alerts and dashboard select job="triton" / job="moodstream-worker".
    assert one(objects, "ServiceMonitor", "triton")["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert one(objects, "PodMonitor", "moodstream-worker")["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert one(objects, "PodMonitor", "moodstream-api")["spec"]["jobLabel"] == "app.kubernetes.io/name"
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert one(objects, "PrometheusRule", "moodstream")["spec"]["groups"] == alerts["groups"]


def test_api_probes_its_health_and_readiness_and_takes_the_catalog_url_from_a_secret(objects):
    deployment = one(objects, "Deployment", "moodstream-api")
    pod = deployment["spec"]["template"]["spec"]
    [api] = pod["containers"]
    assert api["args"] == ["serve"]
    port = {p["name"]: p["containerPort"] for p in api["ports"]}["http"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in api["env"]}
    assert env["MOODSTREAM_CATALOG_URL"]["valueFrom"]["secretKeyRef"]["name"] == "moodstream-catalog"
    config = one_generated(objects, "moodstream-api")["data"]
    assert "MOODSTREAM_CATALOG_URL" not in config
    assert int(config["MOODSTREAM_SERVICE_PORT"]) == port and config["MOODSTREAM_SERVICE_HOST"] == "0.0.0.0"
    # Uploads are spooled to /tmp: it must hold the in-flight bound's worth of the largest upload.
    [tmp] = [v for v in pod["volumes"] if v["name"] == "tmp"]
    assert _bytes(tmp["emptyDir"]["sizeLimit"]) >= int(config["MOODSTREAM_MAX_UPLOAD_BYTES"]) * int(
        config["MOODSTREAM_MAX_ANALYSES_IN_FLIGHT"]
    )
    # The API follows the topic the workers write, on the same cluster, with the same model.
    worker = one_generated(objects, "moodstream-worker")["data"]
    for key in (
        "MOODSTREAM_KAFKA_BOOTSTRAP",
        "MOODSTREAM_KAFKA_SECURITY_PROTOCOL",
        "MOODSTREAM_OUTPUT_TOPIC",
        "MOODSTREAM_TRITON_URL",
        "MOODSTREAM_MODEL",
        "MOODSTREAM_MODEL_VERSION",
    ):
        assert config[key] == worker[key], key
    service = one(objects, "Service", "moodstream-api")
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "moodstream-api"}
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_every_configured_variable_is_a_setting(objects):
    from pipeline.settings import Settings

    known = {f"MOODSTREAM_{name.upper()}" for name in Settings.model_fields}
    for prefix in ("moodstream-worker", "moodstream-api"):
        config = one_generated(objects, prefix)["data"]
        assert {k for k in config if k.startswith("MOODSTREAM_")} <= known, prefix


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return int(quantity[: -len(unit)]) * factor
    return int(quantity)


def test_the_api_serves_metrics_on_their_own_port_to_prometheus_only(objects):
    pod = one(objects, "Deployment", "moodstream-api")["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    config = one_generated(objects, "moodstream-api")["data"]
    assert int(config["MOODSTREAM_SERVICE_METRICS_PORT"]) == ports["metrics"] != ports["http"]
    endpoint = one(objects, "PodMonitor", "moodstream-api")["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics"
    # The Service (what the ingress and clients reach) exposes the page and the API only.
    assert [p["targetPort"] for p in one(objects, "Service", "moodstream-api")["spec"]["ports"]] == ["http"]
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    for rule in one(objects, "NetworkPolicy", "moodstream-api")["spec"]["ingress"]:
        reaches = {p["port"] for p in rule["ports"]}
        assert reaches == ({"metrics"} if rule["from"] == [monitoring] else {"http"}), rule


def test_production_requires_credentials_and_limits_each_client():
    from pipeline.settings import load_settings

    objects = build("prod")
    config = one_generated(objects, "moodstream-api")["data"]
    settings = load_settings(
        **{k.removeprefix("MOODSTREAM_").lower(): v for k, v in config.items() if k.startswith("MOODSTREAM_")}
    )
    assert settings.auth_enabled and settings.auth_jwks_url.startswith("https://")
    assert settings.auth_issuer.startswith("https://") and settings.auth_audience
    assert settings.analyses_per_minute > 0 and settings.queries_per_second > 0
    assert "MOODSTREAM_AUTH_API_KEYS" not in config  # entries come from the Secret's file
    pod = one(objects, "Deployment", "moodstream-api")["spec"]["template"]["spec"]
    [keys] = [v for v in pod["volumes"] if v["name"] == "api-keys"]
    assert keys["secret"]["secretName"] == "moodstream-api-keys" and not keys["secret"].get("optional")
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "api-keys"]
    assert mount["readOnly"] and settings.auth_api_keys_file.parent.as_posix() == mount["mountPath"]
    assert not of_kind(objects, "Secret")  # the keys' entries are created by the operator, never here
    # The dev overlay is a shared cluster too, but keeps the base's default: auth off.
    dev = one_generated(build("dev"), "moodstream-api")["data"]
    assert dev.get("MOODSTREAM_AUTH_ENABLED", "false") == "false"
