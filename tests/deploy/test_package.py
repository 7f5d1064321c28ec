"""The package as a user installs it: a wheel built from the clone, installed into a fresh virtual
environment, and the ``moodstream`` command run from a folder that is not the clone. The wheel
must carry everything the command reads (schemas, moods.toml, the page's assets, the model
repository): nothing may come from the working directory.

The environment borrows the suite's installed dependencies through a ``.pth`` file (installing
torch again would download gigabytes); the package itself is installed from the wheel alone.
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
import zipfile

import pytest
import requests
from serving import ServiceProcess
from support import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the installed ``moodstream`` script, a folder outside the clone to run it in)."""
    root = tmp_path_factory.mktemp("package")
    wheels = root / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = wheels.glob("moodstream-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = next(venv.glob("lib/python3*/site-packages"))
    (purelib / "borrowed-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return venv / "bin" / "moodstream", elsewhere, wheel


def test_the_wheel_carries_its_data_and_no_dev_only_code(installed):
    _, _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "pipeline/contracts/schemas/track_moods.v2.json",
        "pipeline/stages/moods.toml",
        "pipeline/service/web/index.html",
        "triton_models/musicnn/config.pbtxt",
        "triton_models/musicnn/1/model.onnx",
        "triton_models/musicnn_student/1/model.onnx",
    ):
        assert needed in names, needed
    assert not any(n.startswith(("devstack/", "tests/", "bench/")) for n in names)


def test_installed_command_tags_a_clip_from_another_folder(installed, example_clips):
    moodstream, elsewhere, _ = installed
    helped = subprocess.run([str(moodstream), "--help"], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "tag" in helped.stdout and "serve" in helped.stdout, helped.stderr
    done = subprocess.run(
        [str(moodstream), "tag", "--json", str(example_clips[0])],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)
    assert record["model"]["name"] == "musicnn" and record["patches"] == 10 and record["leading_mood"]["mood"]
    shown = subprocess.run([str(moodstream), "demo"], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 2 and "clone of the repository" in shown.stderr


def test_installed_service_serves_its_page_and_api_from_another_folder(installed, tmp_path):
    moodstream, elsewhere, _ = installed
    with ServiceProcess(tmp_path, command=[str(moodstream), "serve"], cwd=elsewhere) as service:
        page = requests.get(service.url + "/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        script = requests.get(service.url + "/static/app.js", timeout=10)
        assert script.status_code == 200 and len(script.content) > 1000
        moods = requests.get(service.url + "/v1/moods", timeout=10).json()
        assert moods["model"]["name"] == "musicnn" and "happy" in moods["moods"]
