"""The Dockerfiles, read without building them: what they copy exists (and passes .dockerignore),
the worker image installs the package by hash from the images' lock, whose pins are main.txt's,
and no dev-only code; every image runs as non-root. Building and running the images:
test_images.py (marker ``images``)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

import pytest
from support import REPO

DOCKER = REPO / "deploy" / "docker"


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = (DOCKER / dockerfile).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def dockerignore_allows(path: str) -> bool:
    allowed = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


DOCKERFILES = ["worker.Dockerfile", "models.Dockerfile", "triton.Dockerfile"]


@pytest.mark.parametrize("dockerfile", ["worker.Dockerfile", "models.Dockerfile"])
def test_copied_sources_exist_and_reach_the_build_context(dockerfile):
    copies = [args for op, args in instructions(dockerfile) if op == "COPY" and "--from=" not in args]
    assert copies
    for args in copies:
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), source
            assert dockerignore_allows(source.rstrip("/")), f"{source} is excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_final_stage_runs_as_a_non_root_user(dockerfile):
    ops = instructions(dockerfile)
    last_from = max(i for i, (op, _) in enumerate(ops) if op == "FROM")
    users = [args for op, args in ops[last_from:] if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_worker_image_uses_cpu_torch_by_hash_and_no_build_stage_in_the_final_image():
    ops = instructions("worker.Dockerfile")
    args = dict(a.split("=", 1) for op, a in ops if op == "ARG" and "=" in a)
    # Users get PyTorch's CPU builds; `make images` passes PyPI (deploy/images.py).
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    text = " ".join(a for _, a in ops)
    assert "--require-hashes --no-deps -r /tmp/requirements/image.txt" in text
    assert "--no-deps --no-index --no-build-isolation /src" in text
    froms = [a for op, a in ops if op == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build") and froms[1] == "${PYTHON_IMAGE}"
    final = ops[max(i for i, (op, _) in enumerate(ops) if op == "FROM") :]
    assert not any(op == "RUN" and re.search(r"\b(apt-get|gcc|cc|build-essential|pip install)\b", a) for op, a in final)
    labels = " ".join(a for op, a in final if op == "LABEL")
    assert "org.opencontainers.image.revision=" in labels and "io.moodstream.lock.sha256=" in labels


def test_triton_image_is_the_official_one_with_the_model_repository_image():
    ops = instructions("triton.Dockerfile")
    [arg] = [args for op, args in ops if op == "ARG" and args.startswith("TRITON_IMAGE=")]
    assert re.fullmatch(r"TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", arg)
    assert ("FROM", "${MODELS_IMAGE} AS models") in ops
    assert ("COPY", "--from=models --chown=root:root /models/ /models/") in ops
    assert ("COPY", "--chown=root:root triton_models/ /models/") in instructions("models.Dockerfile")


def _pins(path) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (version, hashes) of a lock written with --generate-hashes."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    pins = {}
    for line in text.splitlines():
        if m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)(.*)$", line):
            pins[normalise(m.group(1))] = (m.group(2), frozenset(re.findall(r"--hash=(\S+)", m.group(3))))
    return pins


def test_the_images_lock_is_main_txt_restricted_to_the_package_without_cuda_wheels():
    """requirements/image.txt (make lock): every pin with its hashes, each as main.txt has it;
    the package's dependencies all there; none of torch's CUDA wheels."""
    main, image = _pins(REPO / "requirements" / "main.txt"), _pins(REPO / "requirements" / "image.txt")
    assert image and all(hashes for _, hashes in image.values())
    for name, (version, hashes) in image.items():
        assert main[name][0] == version and hashes <= main[name][1], name
    assert not [n for n in image if n.startswith("nvidia-") or n == "triton"]
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {normalise(re.split(r"[\[<>=;\s]", d)[0]) for d in dependencies} | {"setuptools"} <= set(image)


def _imported_distributions() -> set[str]:
    """Distributions providing the third-party modules that pipeline/ imports."""
    providers = importlib.metadata.packages_distributions()
    names = set()
    for source in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    # devstack: the demo command imports it lazily from a clone (test_the_package_ships_no_dev_only_code)
    third_party = {n for n in names if n not in sys.stdlib_module_names and n not in ("pipeline", "devstack")}
    return {normalise(providers[n][0]) for n in third_party}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(path) -> set[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return {normalise(re.split(r"[\[<>=;\s]", line)[0]) for line in lines if line and not line.startswith("#")}


def test_package_dependencies_cover_every_import_of_the_pipeline():
    listed = {
        normalise(re.split(r"[\[<>=;\s]", d)[0])
        for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    # google.protobuf comes with tritonclient[grpc]; pydantic with pydantic-settings; starlette with fastapi.
    indirect = {
        "protobuf": "tritonclient",
        "pydantic": "pydantic-settings",
        "botocore": "boto3",
        "starlette": "fastapi",
    }
    missing = {d for d in _imported_distributions() if d not in listed and indirect.get(d) not in listed}
    assert not missing, f"pipeline imports these but pyproject.toml's dependencies lack them: {missing}"
    pinned = requirement_names(REPO / "requirements" / "main.txt")
    assert listed <= pinned, "the package's dependencies must be pinned in main.txt (used as constraints)"


def test_the_package_ships_no_dev_only_code():
    """pipeline/ never imports the embedded stack, and the worker image copies no devstack/,
    tests or benchmarks (the images install pyproject.toml's packages only)."""
    for source in (REPO / "pipeline").rglob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] in ("devstack", "bench", "tests")
            ):
                # the demo command imports the stack lazily and says where to find it when it is absent
                assert source.name == "cli.py" and node.module == "devstack", f"{source} imports {node.module}"
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(p.startswith(("devstack", "bench", "tests")) for p in find)
    for dev in ("devstack", "bench", "tests", "deploy/k8s", "deploy/images.py", "requirements/main.txt", ".venv"):
        assert not dockerignore_allows(dev)
    allowed = {
        line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    assert allowed == {
        "requirements/image.txt",
        "pyproject.toml",
        "README.md",
        "pipeline",
        "training",
        "triton_models",
        "deploy/docker/cuda_stubs.py",
    }
