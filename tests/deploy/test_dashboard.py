"""The Grafana dashboard's structure: what Grafana's import needs, checked without a Grafana.

No JSON Schema of the classic dashboard model is published in a package (Grafana ships only
TypeScript types), so this checks the fields the importer and the panels rely on: schema
version, unique panel ids, a 24-column grid without overlaps, a Prometheus datasource through
the dashboard's own datasource variable, and queries on metrics this project defines (whether
they return data is tests/deploy/test_monitoring.py's job).
"""

from __future__ import annotations

import json
import re

from prometheus_client import REGISTRY
from support import REPO

from pipeline import metrics  # noqa: F401 - registers the worker's metrics

DASHBOARD = REPO / "deploy" / "grafana" / "moodstream.json"
PANEL_TYPES = {"row", "timeseries", "stat"}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_top_level_fields_of_an_importable_dashboard():
    board = load()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["uid"] == "moodstream" and len(board["uid"]) <= 40
    assert board["title"] and isinstance(board["panels"], list) and board["panels"]
    assert "id" not in board or board["id"] is None  # an id would overwrite another dashboard
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"


def test_panels_have_unique_ids_and_sit_on_the_grid_without_overlapping():
    panels = load()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["type"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] >= 1 and g["x"] + g["w"] <= 24 and g["h"] >= 1 and g["y"] >= 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]


def test_every_query_panel_uses_the_datasource_variable_and_known_metrics():
    defined = {m.name for m in REGISTRY.collect()}
    # prometheus_client reports counters without _total and histograms without _bucket etc.
    known = {n for name in defined for n in (name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count")}
    queries = 0
    for p in load()["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"]
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            for name in re.findall(r"\bmoodstream_\w+", t["expr"]):
                assert name in known, f"{p['title']}: {name} is not defined in pipeline/metrics.py"
            queries += 1
    assert queries >= 20


def test_the_dashboard_covers_what_operators_watch():
    exprs = " ".join(t["expr"] for p in load()["panels"] for t in p.get("targets", []))
    for needed in (
        "moodstream_events_consumed_total",
        "moodstream_consumer_lag_messages",
        "moodstream_stage_seconds_bucket",
        "histogram_quantile(0.5",
        "histogram_quantile(0.95",
        "histogram_quantile(0.99",
        "moodstream_dead_letters_total",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_gpu_utilization",
        "moodstream_mood_score",
        "moodstream_auth_refusals_total",
        "moodstream_rate_limited_total",
        "moodstream_rate_limit_clients",
    ):
        assert needed in exprs, needed
