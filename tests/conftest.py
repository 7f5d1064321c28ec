"""Fixtures shared by the whole suite: real music clips and synthesised audio files."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import CLIP_A, CLIP_B, EXAMPLES


@pytest.fixture(scope="session", autouse=True)
def faust_datadir(tmp_path_factory):
    """Faust creates ``<app id>-data`` in the working directory of every worker the tests start
    (the checkout); FAUST_DATADIR, inherited by those processes, puts it in a temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FAUST_DATADIR", str(tmp_path_factory.mktemp("faust") / "{conf.name}-data"))
        yield


@pytest.fixture(scope="session")
def example_clips() -> list[Path]:
    clips = [CLIP_A, CLIP_B]
    missing = [c.name for c in clips if not c.is_file()]
    if missing:
        pytest.fail(
            f"real music clips missing in {EXAMPLES}: {missing}; `make clips` writes them (`make test` does it first)"
        )
    return clips
