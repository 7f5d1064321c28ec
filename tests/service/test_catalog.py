"""The catalog store on both of its databases: SQLite (a file) and PostgreSQL (Debian's server,
started here as a real process by :class:`devstack.stack.EmbeddedPostgres`).

Every store test runs once per database; each gets an empty database of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import jsonschema
import numpy as np
import pytest
from aiokafka import TopicPartition

from devstack import EmbeddedPostgres, free_ports
from pipeline import metrics
from pipeline.contracts import events
from pipeline.errors import ConfigError, ServiceUnavailable
from pipeline.service.catalog import MIGRATIONS, CatalogStore, follow
from pipeline.stages import taxonomy
from pipeline.stages.taxonomy import encode_embedding

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
MODEL = events.ModelRef("musicnn", "1+cal.0badcafe", (("musicnn_msd", "1"), ("musicnn_mtt", "1")))
_names = itertools.count()


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    with EmbeddedPostgres(log_dir=tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    return request.getfixturevalue("postgres").create_database(f"catalog_{next(_names)}")


@pytest.fixture
def store(url):
    opened = CatalogStore.open(url)
    opened._url = url  # for tests that open the same database again
    yield opened
    opened.close()


def record(
    track_id: str,
    moods: dict[str, float],
    *,
    at: datetime = T0,
    model: events.ModelRef = MODEL,
    vector: list[float] | None = None,
    valence: float = 0.0,
    arousal: float = 0.0,
    **run: Any,
) -> dict[str, Any]:
    """A schema-valid v3 record of ``track_id`` (round-tripped through its JSON, as consumers read it)."""
    top = sorted(moods.items(), key=lambda kv: -kv[1])
    lead = {"mood": top[0][0], "confidence": top[0][1], "clear": True}
    quadrant = taxonomy.quadrant(valence, arousal)
    analysis = {
        "tags": {"musicnn_msd": {"happy": 0.5, "rock": 0.25}, "musicnn_mtt": {"fast": 0.25}},
        "top_tags": {"musicnn_msd": [{"tag": "happy", "score": 0.5}], "musicnn_mtt": [{"tag": "fast", "score": 0.25}]},
        "mood_source": "tags",
        "moods": moods,
        "top_moods": [{"mood": m, "score": s} for m, s in top[:3]],
        "leading_mood": lead,
        "valence": valence,
        "arousal": arousal,
        "quadrant": quadrant,
        "quadrant_probabilities": None,
        "mood_percentiles": moods,
        "timeline": [
            {
                "start_s": 0.0,
                "end_s": 30.0,
                "moods": moods,
                "top_moods": [],
                "leading_mood": lead,
                "valence": valence,
                "arousal": arousal,
                "quadrant": quadrant,
                "quadrant_probabilities": None,
            }
        ],
        "audio_features": run.pop("audio_features", None),
        "embeddings": {}
        if vector is None
        else {
            "musicnn_msd": {
                "dim": len(vector),
                "dtype": "float16",
                "data": encode_embedding(np.asarray(vector, np.float32)),
            }
        },
        "duration_s": 30.0,
        "analysed_s": 30.0,
        "patches": 10,
        "decoder": "pyav",
    }
    value = events.TrackMoods(
        track_id=track_id,
        model=model,
        analysis=analysis,
        processed_at=at,
        latency_ms=run.get("latency_ms", {"total": 80.0}),
        correlation_id=run.get("correlation_id", "c-1"),
        ingested_at=run.get("ingested_at", T0 - timedelta(seconds=5)),
    ).to_json()
    parsed = json.loads(value)
    schema = events.load_schema("track_moods.v3")
    jsonschema.validate(parsed, schema)
    return parsed


# --- migrations -------------------------------------------------------------------------------


def test_an_empty_database_gets_every_migration_once(url):
    first = CatalogStore.open(url)
    assert first.schema_version == len(MIGRATIONS)
    first.upsert(record("t-1", {"happy": 0.7}))
    first.close()
    again = CatalogStore.open(url)  # nothing left to apply; nothing lost
    assert again.schema_version == len(MIGRATIONS) and again.count() == 1
    versions = [v for (v,) in again._query("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    again.close()


def test_an_older_schema_is_migrated_forward_keeping_its_rows(url):
    old = CatalogStore.open(url, migrate_to=1)
    assert old.schema_version == 1
    old.upsert(record("t-1", {"relaxed": 0.9}))
    old.close()
    new = CatalogStore.open(url)
    assert new.schema_version == len(MIGRATIONS)
    assert new.ranked(mood="relaxed")[0]["track_id"] == "t-1"
    new.close()


def test_a_schema_newer_than_the_code_is_refused(url):
    store = CatalogStore.open(url)
    with store._transaction() as cur:  # what a newer release's migration leaves behind
        cur.execute(
            store._sql("INSERT INTO schema_migrations (version, applied_at) VALUES (?, CURRENT_TIMESTAMP)"),
            (len(MIGRATIONS) + 1,),
        )
    store.close()
    with pytest.raises(ConfigError, match="newer than this release"):
        CatalogStore.open(url)


def test_a_url_of_another_kind_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"sqlite:///path\.db or postgresql://"):
        CatalogStore.open("mysql://db/catalog")
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(ConfigError, match="cannot open the SQLite catalog"):
        CatalogStore.open(f"sqlite:///{tmp_path / 'taken' / 'catalog.db'}")


def test_an_unreachable_postgresql_is_an_outage_and_its_password_is_not_repeated():
    port = free_ports(1)[0]
    with pytest.raises(ServiceUnavailable) as caught:
        CatalogStore.open(f"postgresql://moodstream:s3cr3t-pw@127.0.0.1:{port}/catalog")
    assert "s3cr3t-pw" not in str(caught.value) and "does not answer" in str(caught.value)


async def test_a_postgresql_that_goes_away_is_an_outage_and_follow_commits_nothing(tmp_path):
    with EmbeddedPostgres(log_dir=tmp_path) as server:
        store = CatalogStore.open(server.url)
        store.upsert(record("t-1", {"happy": 0.5}))
    with pytest.raises(ServiceUnavailable, match="PostgreSQL catalog failed"):
        store.upsert(record("t-2", {"happy": 0.5}))
    stop = asyncio.Event()
    consumer = FakeConsumer([[json.dumps(record("t-2", {"happy": 0.9})).encode()]], stop)
    with pytest.raises(ServiceUnavailable):
        await follow(consumer, store, None, stop=stop)
    assert consumer.committed == []  # re-delivered once the service reconnects


# --- upserts ------------------------------------------------------------------------------------


def test_a_redelivered_or_reanalysed_record_changes_nothing(store):
    first = record("t-1", {"happy": 0.8, "sad": 0.1})
    assert store.upsert(first) is True
    seq = store.last_seq()
    assert store.upsert(first) is False  # at-least-once: the same message again
    later = record(
        "t-1",
        {"happy": 0.8, "sad": 0.1},
        at=T0 + timedelta(hours=1),
        latency_ms={"total": 95.0},
        correlation_id="c-2",
        ingested_at=T0,
    )
    assert store.upsert(later) is False  # the same audio tagged again by the same model
    assert store.count() == 1 and store.last_seq() == seq
    assert store.track("t-1") == first


def test_a_changed_record_replaces_the_stored_one_with_a_new_row(store):
    store.upsert(record("t-1", {"happy": 0.8}))
    seq = store.last_seq()
    changed = record("t-1", {"happy": 0.2, "sad": 0.9}, at=T0 + timedelta(minutes=1))
    assert store.upsert(changed) is True
    assert store.last_seq() > seq and store.count() == 1
    assert store.track("t-1") == changed
    assert [s["track_id"] for s in store.ranked(mood="happy")] == ["t-1"]
    assert store.ranked(mood="happy")[0]["score"] == pytest.approx(0.2)


def test_each_model_version_keeps_its_record_and_the_newest_is_the_tracks(store):
    old = record("t-1", {"happy": 0.9})
    newer_model = events.ModelRef("musicnn", "2+cal.0badcafe", MODEL.networks)
    new = record("t-1", {"happy": 0.1, "dark": 0.8}, at=T0 + timedelta(days=1), model=newer_model)
    store.upsert(old)
    store.upsert(new)
    assert store._query("SELECT COUNT(*) FROM records")[0][0] == 2
    assert store.track("t-1")["model"]["version"] == "2+cal.0badcafe"
    assert store.ranked(mood="dark")[0]["track_id"] == "t-1"
    # A late re-delivery of the old model's record does not make it the newest again.
    assert store.upsert(old) is False
    assert store.track("t-1")["model"]["version"] == "2+cal.0badcafe"


def test_unknown_tracks_are_none_and_missing_from_summaries(store):
    store.upsert(record("t-1", {"happy": 0.5}))
    assert store.track("nope") is None
    assert set(store.summaries(["t-1", "nope", "t-1"])) == {"t-1"}


# --- feeds --------------------------------------------------------------------------------------


def fill(store: CatalogStore) -> None:
    for i, (track_id, relaxed, valence, arousal) in enumerate(
        [
            ("calm", 0.95, 0.5, -0.6),
            ("mid", 0.5, -0.4, -0.3),
            ("loud", 0.05, 0.6, 0.8),
            ("grim", 0.3, -0.7, 0.5),
        ]
    ):
        store.upsert(
            record(
                track_id,
                {"relaxed": relaxed, "energetic": 1 - relaxed},
                at=T0 + timedelta(minutes=i),
                valence=valence,
                arousal=arousal,
            )
        )


def test_ranked_by_mood_best_first_with_a_limit(store):
    fill(store)
    ranked = store.ranked(mood="relaxed", limit=3)
    assert [r["track_id"] for r in ranked] == ["calm", "mid", "grim"]
    assert [r["score"] for r in ranked] == pytest.approx([0.95, 0.5, 0.3])
    assert set(ranked[0]) >= {
        "track_id",
        "model",
        "processed_at",
        "leading_mood",
        "moods",
        "valence",
        "arousal",
        "quadrant",
    }
    assert "tags" not in ranked[0] and "embeddings" not in ranked[0]
    assert store.ranked(mood="tender") == []


def test_ranked_within_a_region_of_the_mood_plane(store):
    fill(store)
    assert [r["track_id"] for r in store.ranked(valence=(0.0, 1.0))] == ["loud", "calm"]  # newest first without a mood
    assert [r["track_id"] for r in store.ranked(mood="relaxed", valence=(-1.0, 0.0), arousal=(-1.0, 0.0))] == ["mid"]
    assert [r["track_id"] for r in store.ranked(quadrant="angry")] == ["grim"]
    assert [r["track_id"] for r in store.ranked(mood="energetic", quadrant="happy")] == ["loud"]


# --- what the neighbour index reads ----------------------------------------------------------------


def features(tempo: float | None, key: int, mode: int, energy: float, **over: Any) -> dict[str, Any]:
    """A schema-valid ``audio_features`` object."""
    return {
        "duration_s": 30.0,
        "sample_rate": 44100,
        "channels": 2,
        "analysed": "track",
        "tempo": tempo,
        "tempo_confidence": 0.8 if tempo else 0.0,
        "beats": [0.5, 1.0],
        "downbeats": [0.5],
        "time_signature": 4 if tempo else -1,
        "time_signature_confidence": 0.7,
        "key": key,
        "mode": mode,
        "key_confidence": 0.6,
        "loudness": -12.0,
        "loudness_range": 6.0,
        "true_peak": -1.0,
        "fade_in_end_s": 0.0,
        "fade_out_start_s": 30.0,
        "energy": energy,
        "danceability": 0.5,
        "speechiness": 0.05,
        "acousticness": 0.3,
        "instrumentalness": 0.9,
        "liveness": 0.1,
        "valence": 0.6,
        "sections": [
            {
                "start": 0.0,
                "duration": 30.0,
                "tempo": tempo,
                "tempo_confidence": 0.5,
                "key": key,
                "mode": mode,
                "key_confidence": 0.5,
                "loudness": -12.0,
            }
        ],
        **over,
    }


def test_ranked_by_audio_features_filters_and_sorts(store):
    for i, (track_id, tempo, key, mode, energy) in enumerate(
        [
            ("a", 124.0, 9, 0, 0.9),
            ("b", 126.0, 9, 0, 0.4),
            ("c", 90.0, 9, 0, 0.95),
            ("d", 125.0, 2, 1, 0.7),
            ("e", None, -1, -1, 0.1),
        ]
    ):
        store.upsert(
            record(
                track_id,
                {"relaxed": 0.5},
                at=T0 + timedelta(minutes=i),
                audio_features=features(tempo, key, mode, energy),
            )
        )
    store.upsert(record("no-features", {"relaxed": 0.5}, at=T0 + timedelta(minutes=9)))
    found = store.ranked(ranges={"tempo": (120.0, 128.0)}, exact={"key": 9, "mode": 0}, sort="-energy")
    assert [t["track_id"] for t in found] == ["a", "b"]
    assert found[0]["audio_features"]["tempo"] == 124.0 and found[0]["audio_features"]["key"] == 9
    assert [t["track_id"] for t in store.ranked(sort="energy")] == ["e", "b", "d", "a", "c"]
    assert [t["track_id"] for t in store.ranked(ranges={"energy": (0.8, 1.0)}, sort="-tempo")] == ["a", "c"]
    assert len(store.ranked()) == 6  # without a feature filter, tracks without features too
    with pytest.raises(ValueError, match="unknown audio features"):
        store.ranked(sort="-energy; DROP TABLE records")
    with pytest.raises(ValueError, match="unknown audio features"):
        store.ranked(ranges={"tempo) OR (1=1": (0.0, 1.0)})


def test_a_newer_record_without_features_drops_the_old_ones(store):
    store.upsert(record("x", {"relaxed": 0.5}, at=T0, audio_features=features(120.0, 0, 1, 0.5)))
    assert [t["track_id"] for t in store.ranked(exact={"key": 0})] == ["x"]
    store.upsert(
        record(
            "x", {"relaxed": 0.5}, at=T0 + timedelta(minutes=1), model=events.ModelRef("other", "1", (("net", "1"),))
        )
    )
    assert store.ranked(exact={"key": 0}) == [] and store.track("x")["audio_features"] is None


def test_changed_since_pages_through_the_newest_rows_and_embeddings_decode(store):
    for i in range(5):
        store.upsert(record(f"t-{i}", {"happy": 0.5}, vector=[1.0, float(i), 0.5]))
    store.upsert(record("no-vector", {"happy": 0.5}))
    seq, first = store.changed_since(0, limit=2)
    assert [t for t, _ in first] == ["t-0", "t-1"]
    seq, rest = store.changed_since(seq, limit=10)
    assert [t for t, _ in rest] == ["t-2", "t-3", "t-4", "no-vector"]
    assert store.changed_since(seq) == (seq, [])
    vectors = dict(store.embeddings("musicnn_msd"))
    assert set(vectors) == {f"t-{i}" for i in range(5)}
    np.testing.assert_allclose(vectors["t-3"], [1.0, 3.0, 0.5], rtol=1e-3)  # float16 on the wire
    assert dict(store.embeddings("musicnn_mtt")) == {}


# --- the consumer of tracks.moods ------------------------------------------------------------------


class FakeConsumer:
    """The part of aiokafka's consumer that :func:`follow` uses: batches, then nothing."""

    def __init__(self, batches: list[list[bytes]], stop: asyncio.Event) -> None:
        self.tp = TopicPartition("tracks.moods", 0)
        self._batches = batches
        self._stop = stop
        self.offset = 0
        self.committed: list[int] = []

    async def getmany(self, timeout_ms: int) -> dict:
        if not self._batches:
            self._stop.set()
            return {}
        messages = []
        for value in self._batches.pop(0):
            messages.append(SimpleNamespace(value=value, offset=self.offset))
            self.offset += 1
        return {self.tp: messages}

    async def commit(self) -> None:
        self.committed.append(self.offset)

    def assignment(self) -> set:
        return {self.tp}

    def highwater(self, tp) -> int:
        return self.offset + sum(len(b) for b in self._batches)

    async def position(self, tp) -> int:
        return self.offset


def counted(outcome: str) -> float:
    return metrics.CATALOG_RECORDS.labels(outcome)._value.get()


async def test_follow_stores_each_record_once_skips_bad_ones_and_commits_after_storing(tmp_path, caplog):
    store = CatalogStore.open(f"sqlite:///{tmp_path / 'catalog.db'}")
    good = json.dumps(record("t-1", {"happy": 0.9})).encode()
    other = json.dumps(record("t-2", {"sad": 0.9})).encode()
    breaks_schema = json.dumps({**record("t-3", {"sad": 0.9}), "track_id": 3}).encode()
    retired = json.dumps({**record("t-4", {"sad": 0.9}), "schema_version": 1}).encode()
    stop = asyncio.Event()
    consumer = FakeConsumer([[good, good, b"{not json"], [other, breaks_schema, retired, None]], stop)
    before = {o: counted(o) for o in ("stored", "unchanged", "rejected")}

    await asyncio.wait_for(follow(consumer, store, None, stop=stop), 30)

    assert {o: counted(o) - before[o] for o in before} == {"stored": 2, "unchanged": 1, "rejected": 4}
    assert consumer.committed == [3, 7]  # one commit per batch, after its records
    assert store.count() == 2 and store.track("t-3") is None and store.track("t-4") is None
    assert metrics.CATALOG_LAG.labels("0")._value.get() == 0
    assert metrics.CATALOG_TRACKS._value.get() == 2
    assert "is not JSON" in caplog.text and "breaks the tracks.moods v3 schema" in caplog.text
    assert "not a tracks.moods record of a version this catalog stores ([2, 3])" in caplog.text


# --- SQL injection through every filter ------------------------------------------------------------

#: What an attacker puts where a mood, quadrant or track id goes: quotes closing the literal,
#: stacked statements, unions, comments, LIKE wildcards, a NUL, a slow query.
INJECTIONS = (
    "' OR '1'='1",
    "relaxed' OR 1=1 --",
    "relaxed') OR ('a'='a",
    "x'; DROP TABLE records; --",
    'x"; DROP TABLE track_latest; --',
    "' UNION SELECT record, 1.0 FROM records --",
    "1; DELETE FROM schema_migrations",
    "relaxed'/**/OR/**/'1'='1",
    "%",
    "_",
    "\\'; SELECT pg_sleep(5); --",
    "x\x00' OR '1'='1",
)


def catalog_state(store: CatalogStore) -> tuple[int, int, list[str]]:
    tracks = sorted(t["track_id"] for t in store.ranked(limit=500))
    return store.count(), store.schema_version, tracks


def test_injection_through_every_filter_matches_nothing_and_changes_nothing(store):
    store.upsert(record("t-1", {"relaxed": 0.9, "happy": 0.2}, valence=0.5, arousal=-0.5))
    store.upsert(record("t-2", {"happy": 0.8}, valence=0.6, arousal=0.6))
    hostile = "x' OR '1'='1; DROP TABLE records; --"
    store.upsert(record(hostile, {"relaxed": 0.1}))  # a track whose id is itself a payload
    before = catalog_state(store)
    for payload in INJECTIONS:
        assert store.track(payload) is None, payload
        assert store.ranked(mood=payload) == [], payload
        assert store.ranked(quadrant=payload) == [], payload
        assert store.ranked(mood="relaxed", quadrant=payload) == [], payload
        assert set(store.summaries([payload, "t-1"])) == {"t-1"}, payload
        with pytest.raises(ValueError):  # a feature name becomes a column: only known ones
            store.ranked(sort=payload)
        with pytest.raises(ValueError):
            store.ranked(ranges={payload: (0.0, 1.0)})
    # The one payload that is a stored id finds exactly that track, and only it.
    assert store.track(hostile)["track_id"] == hostile
    assert set(store.summaries([hostile])) == {hostile}
    assert [t["track_id"] for t in store.ranked(mood="relaxed")] == ["t-1", hostile]
    # Numbers go in as numbers: a range or limit cannot carry text into the statement.
    with pytest.raises((ValueError, TypeError)):
        store.ranked(limit="1; DROP TABLE records")  # type: ignore[arg-type]
    assert catalog_state(store) == before
    again = CatalogStore.open(store_url(store))  # every table still there, same schema
    assert again.schema_version == len(MIGRATIONS) and again.count() == 3
    again.close()


def store_url(store: CatalogStore) -> str:
    return store._url  # set by the fixture below


@pytest.mark.integration
def test_injection_through_the_http_api_on_both_databases(url, tmp_path):
    """Every filter of the catalog routes, through a running service on SQLite and on
    PostgreSQL: a payload is refused (400) or matches nothing (200 with no tracks, 404),
    never an error of the database (5xx), and the catalog is unchanged afterwards."""
    import requests
    from serving import ServiceProcess

    store = CatalogStore.open(url)
    store.upsert(record("t-1", {"relaxed": 0.9}, valence=0.5, arousal=-0.5))
    store.upsert(record("t-2", {"happy": 0.8}, valence=0.6, arousal=0.6))
    before = catalog_state(store)
    store.close()
    asked = 0
    with ServiceProcess(tmp_path, MOODSTREAM_CATALOG_URL=url) as service:
        for payload in INJECTIONS:
            for params in (
                {"mood": payload},
                {"quadrant": payload},
                {"valence": payload},
                {"arousal": payload},
                {"valence": f"0,1{payload}"},
                {"limit": payload},
                {"mood": "relaxed", "valence": "0,1", "arousal": "-1,0", "quadrant": payload},
                {"tempo": payload},
                {"key": payload},
                {"sort": payload},
                {"energy": f"0,1{payload}", "mode": "0"},
            ):
                answer = requests.get(service.url + "/v1/tracks", params=params, timeout=30)
                asked += 1
                assert answer.status_code in (200, 400), (params, answer.status_code, answer.text)
                if answer.status_code == 200:
                    assert answer.json()["tracks"] == [], params
                else:
                    assert answer.headers["content-type"] == "application/problem+json"
            for path in (f"/v1/tracks/{payload}", f"/v1/tracks/{payload}/similar", f"/v1/tracks/{payload}/features"):
                answer = requests.get(service.url + path.replace("%", "%25"), timeout=30)
                asked += 1
                assert answer.status_code in (400, 404), (path, answer.status_code, answer.text)
                assert answer.headers["content-type"] == "application/problem+json"
        ranked = requests.get(service.url + "/v1/tracks", params={"mood": "relaxed"}, timeout=30).json()
        assert [t["track_id"] for t in ranked["tracks"]] == ["t-1"]
    assert asked == len(INJECTIONS) * 14
    store = CatalogStore.open(url)
    assert catalog_state(store) == before
    store.close()


async def test_a_record_no_catalog_can_store_is_skipped_and_the_catalog_follows_on(store, caplog):
    """A NUL in a track id or mood name (valid JSON, valid v2) would make PostgreSQL refuse the
    row and stop the consumer: it is rejected like a record off the schema."""
    poison = [
        json.dumps(record("bad\x00id", {"happy": 0.5})).encode(),
        json.dumps(record("t-9", {"hap\x00py": 0.5})).encode(),
    ]
    good = json.dumps(record("t-1", {"happy": 0.5})).encode()
    stop = asyncio.Event()
    consumer = FakeConsumer([[*poison, good]], stop)
    before = metrics.CATALOG_RECORDS.labels("rejected")._value.get()
    await asyncio.wait_for(follow(consumer, store, None, stop=stop), 30)
    assert metrics.CATALOG_RECORDS.labels("rejected")._value.get() - before == 2
    assert store.count() == 1 and store.track("t-1") is not None and consumer.committed == [3]
    assert "NUL character in its track_id" in caplog.text and "in its mood names" in caplog.text
