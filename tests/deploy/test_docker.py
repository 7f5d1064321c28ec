"""The Dockerfiles, without a Docker engine: what they copy exists (and passes .dockerignore),
the worker image installs the package, whose dependencies cover every import of pipeline/, and
no dev-only code; both run as non-root. Building the images is not tested here."""

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


@pytest.mark.parametrize("dockerfile", ["worker.Dockerfile", "triton.Dockerfile"])
def test_copied_sources_exist_and_reach_the_build_context(dockerfile):
    copies = [args for op, args in instructions(dockerfile) if op == "COPY" and "--from=" not in args]
    assert copies
    for args in copies:
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), source
            assert dockerignore_allows(source.rstrip("/")), f"{source} is excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", ["worker.Dockerfile", "triton.Dockerfile"])
def test_final_stage_runs_as_a_non_root_user(dockerfile):
    ops = instructions(dockerfile)
    last_from = max(i for i, (op, _) in enumerate(ops) if op == "FROM")
    users = [args for op, args in ops[last_from:] if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_worker_image_uses_cpu_torch_and_no_build_stage_in_the_final_image():
    ops = instructions("worker.Dockerfile")
    text = " ".join(args for _, args in ops)
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    froms = [args for op, args in ops if op == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build") and "slim" in (DOCKER / "worker.Dockerfile").read_text()
    final = ops[max(i for i, (op, _) in enumerate(ops) if op == "FROM") :]
    assert not any(
        op == "RUN" and re.search(r"\b(apt-get|gcc|build-essential|pip install)\b", args) for op, args in final
    )


def test_triton_image_is_the_official_one_with_the_model_repository():
    ops = instructions("triton.Dockerfile")
    [arg] = [args for op, args in ops if op == "ARG" and args.startswith("TRITON_IMAGE=")]
    assert re.fullmatch(r"TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", arg)
    assert ("COPY", "--chown=root:root triton_models/ /models/") in ops


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
    for dev in ("devstack", "bench", "tests"):
        assert not dockerignore_allows(dev)
