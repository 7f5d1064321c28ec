"""One embedded stack (Tansu, moto S3, CPU Triton) for the whole fault suite, and the summary
that every scenario reports: tracks announced, outputs, dead letters, duplicates, recovery s.

The summary is printed at the end of the run (``pytest_terminal_summary``), so it shows in CI
logs without ``-s``.
"""

from __future__ import annotations

import os

import pytest

from devstack import EmbeddedStack
from pipeline.settings import load_settings
from pipeline.stages import storage

from .kit import BUCKET, MODEL

_SUMMARY: list[str] = []


@pytest.fixture(scope="package")
def stack(tmp_path_factory):
    """One stack for the fault scenarios, stopped when they are done; the AWS_* variables that
    point clients at it are set for the package and restored afterwards (later tests run
    their own S3 servers or mocks)."""
    settings = load_settings()
    with EmbeddedStack(
        log_dir=tmp_path_factory.mktemp("fault-stack-logs"), model_repository=settings.model_repository, models=[MODEL]
    ) as s:
        aws = {k: v for k, v in s.env().items() if k.startswith("AWS_")}
        saved = {k: os.environ.get(k) for k in aws}
        os.environ.update(aws)
        try:
            storage.make_s3_client().create_bucket(Bucket=BUCKET)
            yield s
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def summary(request):
    """summary(announced=, outputs=, dlq=, duplicates=, recovery_s=, **more) records the
    scenario's line for the end-of-run table."""

    def record(
        *, announced: int, outputs: int, dlq: int, duplicates: int, recovery_s: float | None = None, **more: object
    ) -> None:
        recovery = "-" if recovery_s is None else f"{recovery_s:.1f}"
        extra = "".join(f" {k}={v}" for k, v in more.items())
        _SUMMARY.append(
            f"{request.node.name}: announced={announced} outputs={outputs} dlq={dlq} duplicates={duplicates} recovery_s={recovery}{extra}"
        )

    return record


def pytest_terminal_summary(terminalreporter):
    if _SUMMARY:
        terminalreporter.section("fault scenarios")
        for line in _SUMMARY:
            terminalreporter.write_line(line)
