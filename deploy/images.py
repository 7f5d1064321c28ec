"""`make images`: the worker/API image and the model-repository image, built with podman from
deploy/docker/*.Dockerfile on a Debian bookworm base made here, each with an SBOM and a
vulnerability report beside it.

    python deploy/images.py            # build what changed; print a summary
    python deploy/images.py --json     # the same, the summary as JSON

Only PyPI and Debian are reachable where this runs, so the Dockerfiles' defaults for users (the
python:3.11-slim image, PyTorch's CPU index) are replaced through their build arguments:

* the base: Debian bookworm made with ``debootstrap --variant=minbase`` (python3.11,
  ca-certificates), its docs and package lists dropped, imported with ``podman import``; the
  build stage's base adds python3.11-venv and a C compiler (apt-get, in a throw-away build);
* torch from PyPI (TORCH_INDEX=https://pypi.org/simple): the CUDA build, by hash, without its
  nvidia-* wheels, with stand-in CUDA libraries (deploy/docker/cuda_stubs.py).

Every image is tagged with a key: the sha256 of its Dockerfile, of every file it copies and of
its build arguments (the base's key included), so a tree whose inputs are unchanged reuses the
images (and a commit that changes only tests or docs rebuilds nothing). Labels record the commit
built (``org.opencontainers.image.revision``) and the images' lock's sha256
(``io.moodstream.lock.sha256``, requirements/image.txt). Beside the images, in build/images/:
``<image>-<key>.cdx.json`` (CycloneDX SBOM of the image's Python environment, cyclonedx-py),
``<image>-<key>.audit.json`` (pip-audit of the same packages against PyPI's advisories: a report,
never a gate) and ``images.json`` (tags, sizes, files).

podman runs with deploy/podman/containers.conf (CONTAINERS_CONF). Needs root (debootstrap,
podman's image mounts); `make tools` installs podman, runc and debootstrap.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
OUT = REPO / "build" / "images"
CACHE = Path(os.environ.get("MOODSTREAM_CACHE", Path.home() / ".cache" / "moodstream"))
CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"
IMAGE_LOCK = REPO / "requirements" / "image.txt"

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
RUNTIME_PACKAGES = ("python3.11", "ca-certificates")
BUILD_PACKAGES = ("python3.11-venv", "gcc", "libc6-dev")
#: Dropped from the base's root filesystem: documentation, manuals, translations, apt's lists.
SLIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/lib/apt/lists", "var/cache/apt")
TORCH_INDEX = "https://pypi.org/simple"
#: What the two images copy from the clone (the Dockerfiles' COPY sources; .dockerignore agrees).
SKIP = ("__pycache__", ".egg-info")


@dataclass
class Image:
    name: str
    tag: str
    key: str
    size_bytes: int
    built_s: float | None  # None: reused
    sbom: str
    audit: str
    vulnerabilities: int | None  # known vulnerabilities pip-audit found; None when it could not ask


def podman(*args: str, capture: bool = True, check: bool = True, **kwargs) -> str:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    done = subprocess.run(["podman", *args], env=env, text=True, capture_output=capture, **kwargs)
    if check and done.returncode != 0:
        detail = (done.stderr or "")[-4000:] if capture else ""
        raise RuntimeError(f"podman {' '.join(args[:3])} ... failed ({done.returncode}): {detail}")
    return (done.stdout or "").strip()


def exists(tag: str) -> bool:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    return subprocess.run(["podman", "image", "exists", tag], env=env).returncode == 0


def digest(*parts: str | bytes | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            files = sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part]
            for f in files:
                if any(s in str(f.relative_to(REPO)) for s in SKIP):
                    continue
                h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
        else:
            h.update(part.encode() if isinstance(part, str) else part)
            h.update(b"\0")
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def revision() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    )
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# --- the base images ---------------------------------------------------------------------------


def runtime_base() -> str:
    """Debian bookworm (minbase) with python3.11 and CA certificates, imported as an image."""
    key = digest(SUITE, MIRROR, *RUNTIME_PACKAGES, *SLIM)
    tag = f"localhost/moodstream-base:{SUITE}-{key}"
    if exists(tag):
        return tag
    if shutil.which("debootstrap") is None:
        sys.exit("make images: debootstrap is missing (make tools installs it; root needed)")
    work = CACHE / "images"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        root = Path(tmp) / "rootfs"
        log = Path(tmp) / "debootstrap.log"
        with open(log, "w") as out:
            done = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(RUNTIME_PACKAGES)}",
                    f"--cache-dir={work / 'debs'}",
                    SUITE,
                    str(root),
                    MIRROR,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if done.returncode != 0:
            sys.exit(f"make images: debootstrap failed:\n{log.read_text()[-3000:]}")
        for path in SLIM:
            shutil.rmtree(root / path, ignore_errors=True)
            (root / path).mkdir(parents=True, exist_ok=True)
        tarball = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(tarball), "."], check=True)
        podman(
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            "ENV LANG=C.UTF-8",
            "--change",
            'CMD ["/bin/bash"]',
            str(tarball),
            tag,
        )
    return tag


def build_base(runtime: str) -> str:
    """The runtime base plus python3.11-venv and a C compiler, for the build stage only."""
    key = digest(runtime, *BUILD_PACKAGES)
    tag = f"localhost/moodstream-build-base:{SUITE}-{key}"
    if exists(tag):
        return tag
    containerfile = (
        f"FROM {runtime}\n"
        "RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
        f"{' '.join(BUILD_PACKAGES)} >/dev/null && rm -rf /var/lib/apt/lists/*\n"
    )
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "Containerfile").write_text(containerfile)
        podman("build", "--network=host", "-t", tag, context)
    return tag


# --- the images --------------------------------------------------------------------------------


@contextlib.contextmanager
def mounted(tag: str) -> Iterator[Path]:
    path = Path(podman("image", "mount", tag))
    try:
        yield path
    finally:
        podman("image", "unmount", tag, check=False)


def build(name: str, dockerfile: str, sources: list[Path], args: dict[str, str]) -> tuple[str, str, float | None]:
    """(tag, key, seconds spent building or None when reused)."""
    key = digest(DOCKER / dockerfile, *sources, *(f"{k}={v}" for k, v in sorted(args.items())))
    tag = f"localhost/{name}:{key}"
    if exists(tag):
        return tag, key, None
    # The lock's hash labels only an image built from it (its key includes the lock): the
    # models' image holds no Python packages and is reused across lock changes.
    labels = {"SOURCE_REVISION": revision()}
    if IMAGE_LOCK in sources:
        labels["LOCK_SHA256"] = file_sha256(IMAGE_LOCK)
    command = ["build", "--network=host", "-f", str(DOCKER / dockerfile), "-t", tag]
    for k, v in {**args, **labels}.items():
        command += ["--build-arg", f"{k}={v}"]
    # pip in the build stage trusts what this host trusts (a proxy's CA included): the host's
    # bundle is mounted for the RUN steps only, never copied into an image.
    bundle = bundle_path()
    if bundle.is_file() and "ARG CA_BUNDLE" in (DOCKER / dockerfile).read_text():
        command += [
            "--volume",
            f"{bundle}:/run/host-ca-certificates.crt:ro",
            "--build-arg",
            "CA_BUNDLE=/run/host-ca-certificates.crt",
        ]
    started = time.monotonic()
    print(f"building {tag} ({dockerfile}) ...", file=sys.stderr, flush=True)
    podman(*command, str(REPO), capture=False)
    podman("tag", tag, f"localhost/{name}:latest")
    # Earlier builds of this image go (2.5 GB each for the worker); the build cache stays.
    for old in podman("images", "--format", "{{.Repository}}:{{.Tag}}", f"localhost/{name}").split():
        if old not in (tag, f"localhost/{name}:latest"):
            podman("rmi", old, check=False)
    return tag, key, time.monotonic() - started


def sbom_and_audit(name: str, tag: str, key: str) -> tuple[Path, Path, int | None]:
    """CycloneDX SBOM and pip-audit report of the image's Python environment (/opt/moodstream
    for the worker; the model image has none: its SBOM lists the model files' component only)."""
    OUT.mkdir(parents=True, exist_ok=True)
    sbom = OUT / f"{name}-{key}.cdx.json"
    audit = OUT / f"{name}-{key}.audit.json"
    if sbom.exists() and audit.exists():
        return sbom, audit, _vulnerabilities(audit)
    tools = Path(sys.executable).parent
    with mounted(tag) as root, tempfile.TemporaryDirectory() as tmp:
        sites = sorted(root.glob("opt/moodstream/lib/python3*/site-packages"))
        # An interpreter whose path is the image's environment (and the standard library, which
        # holds no distributions): cyclonedx-py asks it for sys.path and reads what is there.
        venv = Path(tmp) / "view"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        [own] = venv.glob("lib/python3*/site-packages")
        (own / "image.pth").write_text("".join(f"{s}\n" for s in sites))
        subprocess.run(
            [
                str(tools / "cyclonedx-py"),
                "environment",
                "--pyproject",
                str(REPO / "pyproject.toml"),
                "--mc-type",
                "application",
                "--output-reproducible",
                "--of",
                "JSON",
                "-o",
                str(sbom),
                str(venv / "bin" / "python"),
            ],
            check=True,
            capture_output=True,
        )
        if sites:
            found = subprocess.run(
                [str(tools / "pip-audit"), "--path", str(sites[0]), "--format", "json", "--output", str(audit)],
                capture_output=True,
                text=True,
                timeout=600,
                env={**os.environ, "REQUESTS_CA_BUNDLE": os.environ.get("REQUESTS_CA_BUNDLE", str(bundle_path()))},
            )
            if not audit.exists():
                audit.write_text(json.dumps({"error": found.stderr[-2000:]}))
        else:
            audit.write_text(json.dumps({"dependencies": [], "note": "no Python environment in this image"}))
    return sbom, audit, _vulnerabilities(audit)


def bundle_path() -> Path:
    """The host's CA bundle (what it trusts, a proxy's CA included)."""
    return Path("/etc/ssl/certs/ca-certificates.crt")


def _vulnerabilities(audit: Path) -> int | None:
    """Known vulnerabilities in the report; None when pip-audit could not ask about any package
    (an index without PyPI's per-version JSON API, which carries the advisories, answers 404)."""
    report = json.loads(audit.read_text())
    dependencies = report.get("dependencies")
    if not dependencies or all("skip_reason" in d for d in dependencies):
        return None
    return sum(len(d.get("vulns", [])) for d in dependencies)


def size(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag))


def build_all() -> list[Image]:
    """Build (or reuse) both images; their SBOMs and reports; write build/images/images.json."""
    runtime = runtime_base()
    builder = build_base(runtime)
    package = [
        REPO / "pyproject.toml",
        REPO / "README.md",
        REPO / "pipeline",
        REPO / "training",
        REPO / "triton_models",
    ]
    specs = [
        (
            "moodstream-worker",
            "worker.Dockerfile",
            [IMAGE_LOCK, DOCKER / "cuda_stubs.py", *package],
            {"PYTHON_IMAGE": runtime, "BUILD_IMAGE": builder, "TORCH_INDEX": TORCH_INDEX},
        ),
        ("moodstream-models", "models.Dockerfile", [REPO / "triton_models"], {"BASE_IMAGE": runtime}),
    ]
    images = []
    for name, dockerfile, sources, args in specs:
        tag, key, seconds = build(name, dockerfile, sources, args)
        sbom, audit, vulns = sbom_and_audit(name, tag, key)
        images.append(Image(name, tag, key, size(tag), seconds, str(sbom), str(audit), vulns))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "images.json").write_text(json.dumps([asdict(i) for i in images], indent=2) + "\n")
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    options = parser.parse_args()
    images = build_all()
    if options.json:
        print(json.dumps([asdict(i) for i in images], indent=2))
        return
    for i in images:
        built = "reused" if i.built_s is None else f"built in {i.built_s:.0f} s"
        vulns = "not checked" if i.vulnerabilities is None else f"{i.vulnerabilities} known vulnerabilities"
        print(f"{i.tag}  {i.size_bytes / 1e6:.0f} MB  {built}  SBOM {Path(i.sbom).name}  pip-audit: {vulns}")


if __name__ == "__main__":
    main()
