"""Known vulnerabilities of the locked packages: ``pip-audit`` over each lock file.

Reports everything it finds (the JSON reports are written to the test's tmp folder and summed up
in the test's output); fails only on a **known-exploited** vulnerability of a **served**
package:

* served: what the deployed product runs, the runtime dependencies that pyproject.toml declares
  (``[project].dependencies``) and, transitively, theirs, read from the installed packages'
  metadata (:func:`served_packages`); not the test, lint, training or dev-stack tools;
* known-exploited: one of the vulnerability's ids or aliases is in CISA's Known Exploited
  Vulnerabilities catalog, read from the file ``MOODSTREAM_KEV_CATALOG`` names (CISA's
  ``known_exploited_vulnerabilities.json``) or fetched from CISA.

pip-audit asks PyPI's JSON API about each pinned release (``/pypi/NAME/VERSION/json``). Where that
cannot be reached, or answers for none of the releases, the audit has nothing to report and the
test skips saying so; where served packages have vulnerabilities but the KEV catalog cannot be
had, it skips naming them (it cannot tell whether they are exploited), rather than pass.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from support import REPO

LOCK_FILES = ("requirements/main.txt", "requirements/triton-stub.txt")
KEV_URL = "https://www.cisa.gov/sites/default/files/feeds/known_exploited_vulnerabilities.json"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def served_packages(pyproject: Path = REPO / "pyproject.toml") -> set[str]:
    """The runtime dependencies of pyproject.toml and theirs, transitively (canonical names),
    as the installed distributions' metadata declares them (extras followed where asked for)."""
    wanted = [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    served: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    while wanted:
        requirement = wanted.pop()
        name = canonical(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not for this platform (a marker left it out)
        served.add(name)
        for text in requires:
            child = Requirement(text)
            extras = requirement.extras or {""}
            if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in extras):
                wanted.append(child)
    return served


def audit(lock_file: str, report: Path) -> dict[str, Any]:
    """pip-audit's JSON report of ``lock_file`` (pinned: no resolution, no pip)."""
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("pip-audit")),
            "--requirement",
            str(REPO / lock_file),
            "--no-deps",
            "--disable-pip",
            "--format",
            "json",
            "--aliases",
            "on",
            "--desc",
            "off",
            "--progress-spinner",
            "off",
            "--output",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if run.returncode not in (0, 1) or not report.exists():  # 1: vulnerabilities found
        pytest.skip(f"pip-audit could not audit {lock_file} (offline?): {run.stderr.strip()[-500:]}")
    return json.loads(report.read_text())


def known_exploited() -> set[str] | None:
    """CVE ids of CISA's KEV catalog, or None when it cannot be had."""
    path = os.environ.get("MOODSTREAM_KEV_CATALOG")
    try:
        if path:
            text = Path(path).read_text()
        else:
            with urllib.request.urlopen(KEV_URL, timeout=10) as answer:
                text = answer.read().decode()
        return {entry["cveID"] for entry in json.loads(text)["vulnerabilities"]}
    except (OSError, ValueError, KeyError):
        return None


def findings(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (lock file, package, vulnerability)."""
    return [
        {"lock": lock, "name": canonical(dep["name"]), "version": dep["version"], **vuln}
        for lock, report in reports.items()
        for dep in report["dependencies"]
        for vuln in dep.get("vulns", [])
    ]


def exploited_in_served(rows: list[dict[str, Any]], served: set[str], kev: set[str]) -> list[dict[str, Any]]:
    return [r for r in rows if r["name"] in served and kev & {r["id"], *r.get("aliases", [])}]


# --- the policy, on data made here -------------------------------------------------------------------


def test_served_packages_are_the_runtime_closure_not_the_tools():
    served = served_packages()
    assert {"fastapi", "starlette", "uvicorn", "h11", "pyjwt", "cryptography", "psycopg", "aiokafka"} <= served
    assert "psycopg-binary" in served  # through the psycopg[binary] extra
    assert not {"pytest", "schemathesis", "pip-audit", "selenium", "ruff", "mypy", "moto", "hypothesis"} & served


def test_only_a_known_exploited_vulnerability_of_a_served_package_fails():
    rows = [
        {"name": "starlette", "version": "1", "id": "GHSA-a", "aliases": ["CVE-2099-0001"]},
        {"name": "pytest", "version": "1", "id": "PYSEC-b", "aliases": ["CVE-2099-0002"]},
        {"name": "uvicorn", "version": "1", "id": "GHSA-c", "aliases": ["CVE-2099-0003"]},
    ]
    kev = {"CVE-2099-0001", "CVE-2099-0002"}
    assert [r["id"] for r in exploited_in_served(rows, {"starlette", "uvicorn"}, kev)] == ["GHSA-a"]


# --- the audit ----------------------------------------------------------------------------------------


def test_no_known_exploited_vulnerability_in_a_served_package(tmp_path, capsys):
    reports = {lock: audit(lock, tmp_path / (Path(lock).stem + ".json")) for lock in LOCK_FILES}
    audited = {lock: [d for d in r["dependencies"] if "skip_reason" not in d] for lock, r in reports.items()}
    if not any(audited.values()):
        reasons = {d["skip_reason"] for r in reports.values() for d in r["dependencies"]}
        pytest.skip(
            "pip-audit could audit none of the locked releases: PyPI's per-release JSON API "
            f"(/pypi/NAME/VERSION/json) does not answer from here ({next(iter(reasons), 'no reason given')})"
        )
    rows = findings(reports)
    served = served_packages()
    with capsys.disabled():
        print(f"\npip-audit: {sum(len(a) for a in audited.values())} releases audited, {len(rows)} vulnerabilities")
        for r in rows:
            where = "served" if r["name"] in served else "tools"
            print(f"  [{where}] {r['name']} {r['version']}: {r['id']} {' '.join(r.get('aliases', []))}")
    if not any(r["name"] in served for r in rows):
        return
    kev = known_exploited()
    if kev is None:
        pytest.skip(
            f"vulnerabilities in served packages ({sorted({r['name'] for r in rows if r['name'] in served})}), "
            "and CISA's KEV catalog cannot be read (set MOODSTREAM_KEV_CATALOG to a copy): "
            "cannot tell whether any is known-exploited"
        )
    exploited = exploited_in_served(rows, served, kev)
    assert not exploited, f"known-exploited vulnerabilities in served packages: {exploited}"
