"""The images, built and run as Kubernetes runs them.

``make images`` (deploy/images.py) builds the worker/API image and the model-repository image
with podman, or reuses them while their inputs are unchanged. Then, on the embedded stack
(Tansu, moto S3, CPU tritonserver) and a throw-away PostgreSQL for the catalog, all on the host:

* the model-repository image runs as an init container would (read-only, non-root) and copies
  its repository into a folder, which the stack's tritonserver serves (``--model-config-name=cpu``);
* the dev overlay is rendered (``kubectl kustomize``) and its two Deployments, the worker and the
  API, become ``podman run`` flags (:func:`podman_run_flags`): command, args, env (config maps,
  field and secret references), security context, emptyDirs as tmpfs, limits and grace period
  all come from the rendered objects. What is replaced, and only that: the addresses of the
  host's services (``MOODSTREAM_KAFKA_BOOTSTRAP``, ``MOODSTREAM_TRITON_URL``), the two listening
  ports (the containers share the host's network, so they get free ports and the probes follow),
  the image (the one just built) and, added, the S3 endpoint and credentials a cluster gives
  through the service account;
* a real track is announced, the worker container tags it onto tracks.moods, the API container's
  catalog follows the topic and serves it at ``GET /v1/tracks/{id}``, and the probes the
  manifests declare answer.

podman reaches the host's broker, S3 and Triton on 127.0.0.1 through host networking.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from support import CLIP_A, REPO

from devstack import EmbeddedStack, free_ports
from devstack.postgres import EmbeddedPostgres
from pipeline.contracts import events
from pipeline.stages import storage

pytestmark = [pytest.mark.integration, pytest.mark.images]

OVERLAY = REPO / "deploy" / "k8s" / "overlays" / "dev"
MODEL = "musicnn"
TRACK = "image-test-jazz"


def load_images_module():
    spec = importlib.util.spec_from_file_location("moodstream_images", REPO / "deploy" / "images.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


IMAGES = load_images_module()


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(IMAGES.CONTAINERS_CONF)}
    done = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def images() -> dict:
    if shutil.which("podman") is None or shutil.which("debootstrap") is None:
        pytest.fail(
            "podman or debootstrap is missing: `make tools` installs podman, runc and debootstrap (root needed)"
        )
    return {i.name: i for i in IMAGES.build_all()}


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("`kubectl` is missing: `make tools` installs it")
    out = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


# --- from a rendered Deployment to `podman run` ---------------------------------------------------


def deployment(objects: list[dict], name: str) -> dict:
    [found] = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name]
    return found


def config_map(objects: list[dict], name: str) -> dict[str, str]:
    [found] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    return found.get("data", {})


def container_env(objects: list[dict], dep: dict, pod_name: str, secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The container's environment as the kubelet makes it: config maps, then env entries
    (values, the pod's name, secret keys; an optional key of a missing secret is left out)."""
    [container] = dep["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_map(objects, source["configMapRef"]["name"]))
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]
        if "fieldRef" in ref:
            assert ref["fieldRef"]["fieldPath"] == "metadata.name", ref
            env[entry["name"]] = pod_name
        else:
            key = ref["secretKeyRef"]
            if (key["name"], key["key"]) in secrets:
                env[entry["name"]] = secrets[(key["name"], key["key"])]
            else:
                assert key.get("optional"), f"secret {key['name']}/{key['key']} is required"
    return env


def podman_run_flags(
    objects: list[dict],
    name: str,
    *,
    image: str,
    pod_name: str,
    secrets: dict[tuple[str, str], str],
    replace: dict[str, str],
    add: dict[str, str],
) -> list[str]:
    """``podman run`` arguments for the Deployment ``name``'s one container. ``replace`` may only
    change variables the manifests set; ``add`` only set ones they do not."""
    pod = deployment(objects, name)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = container_env(objects, deployment(objects, name), pod_name, secrets)
    assert set(replace) <= set(env), set(replace) - set(env)
    assert not set(add) & set(env), set(add) & set(env)
    env |= replace | add
    pod_security, security = pod["securityContext"], container["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    flags = [
        "--detach",
        f"--name={pod_name}",
        "--network=host",
        "--pull=never",
        f"--user={pod_security['runAsUser']}:{pod_security['runAsGroup']}",
        f"--stop-timeout={pod.get('terminationGracePeriodSeconds', 30)}",
    ]
    if security.get("readOnlyRootFilesystem"):
        # Only the manifest's volumes are writable: no tmpfs of podman's own on /tmp, /run, /var/tmp.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    if security.get("allowPrivilegeEscalation") is False:
        flags.append("--security-opt=no-new-privileges")
    flags += [f"--cap-drop={c.lower()}" for c in security.get("capabilities", {}).get("drop", [])]
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"  # podman's default profile
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        empty = volumes[mount["name"]]["emptyDir"]
        size = empty.get("sizeLimit")
        if mount["mountPath"] == "/dev/shm":
            flags.append(f"--shm-size={_podman_size(size)}")
        else:
            flags.append(f"--tmpfs={mount['mountPath']}:rw,mode=1777" + (f",size={_podman_size(size)}" if size else ""))
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        flags.append(f"--memory={_podman_size(limits['memory'])}")
    flags += [f"--env={k}={v}" for k, v in sorted(env.items())]
    if "command" in container:
        flags.append(f"--entrypoint={json.dumps(container['command'])}")
    return [*flags, image, *container.get("args", [])]


def _podman_size(quantity: str) -> str:
    for unit, short in (("Ki", "k"), ("Mi", "m"), ("Gi", "g")):
        if quantity.endswith(unit):
            return quantity[: -len(unit)] + short
    return quantity


# --- the test --------------------------------------------------------------------------------------


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def probe_until(url: str, probe: dict, container: str) -> int:
    """Probe as the kubelet does: every periodSeconds, at most failureThreshold times; the status
    of the first success (or of the last try)."""
    status = 0
    for _ in range(probe.get("failureThreshold", 3)):
        try:
            status, _ = get(url, timeout=probe.get("timeoutSeconds", 1) + 2)
        except OSError:
            status = 0
        if 200 <= status < 400:
            return status
        assert podman("inspect", "--format", "{{.State.Running}}", container).stdout.strip() == "true", logs(container)
        time.sleep(probe.get("periodSeconds", 10))
    return status


def logs(container: str) -> str:
    return podman("logs", container, check=False).stdout[-4000:] + podman("logs", container, check=False).stderr[-4000:]


async def announce(bootstrap: str, topic: str, track_id: str, uri: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, events.ingested_record(track_id=track_id, audio_uri=uri), key=track_id.encode()
        )
    finally:
        await producer.stop()


async def first_record(bootstrap: str, topics: list[str], timeout_s: float, container: str) -> tuple[str, dict]:
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                for record in records:
                    return tp.topic, json.loads(record.value)
            running = podman("inspect", "--format", "{{.State.Running}}", container).stdout.strip()
            assert running == "true", logs(container)
    finally:
        await consumer.stop()
    raise AssertionError(f"nothing on {topics} after {timeout_s:.0f} s:\n{logs(container)}")


def test_images_are_labelled_lean_and_have_their_sbom(images):
    worker, models = images["moodstream-worker"], images["moodstream-models"]
    lock = hashlib.sha256((REPO / "requirements" / "image.txt").read_bytes()).hexdigest()
    for image in (worker, models):
        labels = json.loads(podman("image", "inspect", "--format", "{{json .Labels}}", image.tag).stdout)
        assert len(labels["org.opencontainers.image.revision"].split("-")[0]) == 40
        # the models' image holds no Python packages: it is reused across lock changes, unlabelled
        assert labels.get("io.moodstream.lock.sha256") == (lock if image is worker else None)
    sbom = json.loads(Path(worker.sbom).read_text())
    names = {c["name"] for c in sbom["components"]}
    assert sbom["metadata"]["component"]["name"] == "moodstream"
    assert {"torch", "torchaudio", "faust-streaming", "tritonclient"} <= names
    assert not {n for n in names if n.startswith("nvidia-")}, "CUDA wheels in the worker image"
    assert Path(worker.audit).is_file()
    # No compiler, no CUDA libraries, no dev-only code, tests or benchmarks in the worker image.
    check = (
        "import importlib.util, pathlib, shutil, torch, pipeline;"
        "assert not any(shutil.which(c) for c in ('cc', 'gcc', 'g++', 'ld')), 'a compiler';"
        "assert importlib.util.find_spec('devstack') is None and importlib.util.find_spec('bench') is None;"
        "site = pathlib.Path(torch.__file__).parents[1];"
        "assert not (site / 'nvidia').exists() and not (site / 'tests').exists();"
        "assert not torch.cuda.is_available();"
        "print(torch.__version__)"
    )
    done = podman("run", "--rm", "--read-only", "--network=none", "--entrypoint=python", worker.tag, "-c", check)
    assert done.stdout.strip().startswith("2.")


def test_a_track_is_tagged_by_the_worker_container_and_served_by_the_api_container(
    images, rendered, tmp_path, example_clips
):
    worker_image, models_image = images["moodstream-worker"], images["moodstream-models"]
    # The model repository, copied out of its image as an init container would.
    repository = tmp_path / "repository"
    repository.mkdir(mode=0o777)
    repository.chmod(0o777)
    podman(
        "run",
        "--rm",
        "--read-only",
        "--read-only-tmpfs=false",
        "--network=none",
        "--cap-drop=all",
        "--user=10001:10001",
        f"--volume={repository}:/repository",
        models_image.tag,
    )
    assert (repository / MODEL / "configs" / "cpu.pbtxt").is_file()

    worker_config = config_map(rendered, _generated(rendered, "moodstream-worker"))
    api_config = config_map(rendered, _generated(rendered, "moodstream-api"))
    bucket = worker_config["MOODSTREAM_ALLOWED_BUCKETS"]
    topics = [worker_config[f"MOODSTREAM_{t}_TOPIC"] for t in ("INPUT", "OUTPUT", "DLQ")]
    names = {"worker": f"moodstream-worker-{os.getpid()}", "api": f"moodstream-api-{os.getpid()}"}
    with (
        EmbeddedStack(log_dir=tmp_path / "logs", model_repository=repository, models=[MODEL]) as stack,
        EmbeddedPostgres(log_dir=tmp_path / "logs") as catalog,
    ):
        stack.create_topics(topics)
        aws = {k: v for k, v in stack.env().items() if k.startswith("AWS_")}
        saved = {k: os.environ.get(k) for k in aws}
        os.environ.update(aws)
        try:
            s3 = storage.make_s3_client()
            s3.create_bucket(Bucket=bucket)
            s3.upload_file(str(CLIP_A), bucket, f"catalog/{CLIP_A.name}")
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        hosts = {"MOODSTREAM_KAFKA_BOOTSTRAP": stack.kafka_bootstrap, "MOODSTREAM_TRITON_URL": stack.triton_grpc_url}
        metrics_port, api_port = free_ports(2)
        secrets = {("moodstream-catalog", "url"): catalog.url}
        worker_flags = podman_run_flags(
            rendered,
            "moodstream-worker",
            image=worker_image.tag,
            pod_name=names["worker"],
            secrets=secrets,
            replace={**hosts, "MOODSTREAM_METRICS_PORT": str(metrics_port)},
            add=aws,
        )
        api_flags = podman_run_flags(
            rendered,
            "moodstream-api",
            image=worker_image.tag,
            pod_name=names["api"],
            secrets=secrets,
            replace={**hosts, "MOODSTREAM_SERVICE_PORT": str(api_port)},
            add=aws,
        )
        try:
            podman("run", *worker_flags)
            podman("run", *api_flags)
            asyncio.run(announce(stack.kafka_bootstrap, topics[0], TRACK, f"s3://{bucket}/catalog/{CLIP_A.name}"))
            topic, record = asyncio.run(first_record(stack.kafka_bootstrap, topics[1:], 600, names["worker"]))
            assert topic == topics[1], record
            assert record["track_id"] == TRACK and record["model"]["name"] == MODEL
            assert record["top_tags"]["musicnn_msd"][0]["tag"] == "jazz"  # as test_faust_app finds it

            # The worker's metrics endpoint (the PodMonitor's port) counts the output.
            status, body = get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert status == 200 and "moodstream_outputs_total{" in body.decode()

            # The API's probes, as declared; then the track from its catalog.
            api = deployment(rendered, "moodstream-api")["spec"]["template"]["spec"]["containers"][0]
            assert int(api_config["MOODSTREAM_SERVICE_PORT"]) == api["ports"][0]["containerPort"]
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = api[kind]
                url = f"http://127.0.0.1:{api_port}{probe['httpGet']['path']}"
                assert probe_until(url, probe, names["api"]) == 200, (kind, logs(names["api"]))
            deadline = time.monotonic() + 120
            status, body = get(f"http://127.0.0.1:{api_port}/v1/tracks/{TRACK}")
            while status == 404 and time.monotonic() < deadline:
                time.sleep(1)
                status, body = get(f"http://127.0.0.1:{api_port}/v1/tracks/{TRACK}")
            assert status == 200, (status, body[:500], logs(names["api"]))
            served = json.loads(body)
            assert served["moods"] == record["moods"]

            # Both run as the manifests say: non-root, on a read-only root filesystem.
            for container in names.values():
                state = json.loads(podman("inspect", container).stdout)[0]
                assert state["Config"]["User"] == "10001:10001"
                assert state["HostConfig"]["ReadonlyRootfs"] is True
                done = podman(
                    "exec",
                    container,
                    "python",
                    "-c",
                    "import os; print(os.getuid()); open('/written', 'w')",
                    check=False,
                )
                assert done.stdout.split()[0] == "10001" and "Read-only file system" in done.stderr
        finally:
            for container in names.values():
                podman("rm", "--force", "--time=10", container, check=False)


def _generated(objects: list[dict], prefix: str) -> str:
    [name] = [
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(prefix + "-")
    ]
    return name
