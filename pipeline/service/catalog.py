"""The catalog: every track's latest ``tracks.moods`` record in a database, ranked for feeds.

    tracks.moods ─ follow() ─► CatalogStore.upsert ─► records        one row per (track, model, version)
                                               ├► track_latest  the newest record of each track
                                               └► track_moods   its family scores, indexed by (mood, score)

``CatalogStore.open(url)`` takes ``sqlite:///path.db`` (the embedded default) or
``postgresql://user:password@host:port/db`` (production) and applies the versioned migrations
below. Upserts are keyed by (track_id, model name, model version): a record that differs from
the stored one only in when and how fast it was made (``processed_at``, ``latency_ms``,
``correlation_id``, ``ingested_at``) changes nothing, so at-least-once re-deliveries and
re-analyses of the same audio leave the catalog as it was.

Every change gets a new, increasing row number (``seq``), which lets each service replica's
neighbour index catch up on rows other replicas wrote (:meth:`CatalogStore.changed_since`).

Database errors are translated here, at the one module that talks to the drivers: a store that
does not answer is :class:`~pipeline.errors.ServiceUnavailable`, a bad URL or a schema newer than
this code is :class:`~pipeline.errors.ConfigError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from pipeline import metrics
from pipeline.contracts import events
from pipeline.errors import ConfigError, ServiceUnavailable
from pipeline.stages.taxonomy import decode_embedding

log = logging.getLogger(__name__)

#: Fields of a record that say when and how it was made, not what the audio is: a record equal
#: to the stored one apart from these is a duplicate.
VOLATILE_FIELDS = ("processed_at", "latency_ms", "correlation_id", "ingested_at")

#: Schema migrations, in order; version n is MIGRATIONS[n - 1]. ``{id}`` and ``{real}`` become
#: each dialect's auto-increment key and float type. Never edit a released step: add one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: records, the latest record of each track, its mood scores
        """CREATE TABLE records (
            seq {id},
            track_id TEXT NOT NULL,
            model_name TEXT NOT NULL,
            model_version TEXT NOT NULL,
            processed_at TEXT NOT NULL,
            record TEXT NOT NULL,
            UNIQUE (track_id, model_name, model_version))""",
        """CREATE TABLE track_latest (
            track_id TEXT PRIMARY KEY,
            seq BIGINT NOT NULL,
            processed_at TEXT NOT NULL,
            valence {real},
            arousal {real},
            quadrant TEXT)""",
        """CREATE TABLE track_moods (
            track_id TEXT NOT NULL,
            mood TEXT NOT NULL,
            score {real} NOT NULL,
            PRIMARY KEY (track_id, mood))""",
        "CREATE INDEX track_moods_rank ON track_moods (mood, score)",
    ),
    (  # 2: feeds by recency and by region of the mood plane; the index's catch-up query
        "CREATE INDEX track_latest_recent ON track_latest (processed_at)",
        "CREATE INDEX track_latest_plane ON track_latest (valence, arousal)",
        "CREATE INDEX track_latest_seq ON track_latest (seq)",
    ),
    (  # 3: the audio features of each track's newest record (schema 3), for filters and sorting
        """CREATE TABLE track_features (
            track_id TEXT PRIMARY KEY,
            tempo {real},
            key INTEGER,
            mode INTEGER,
            time_signature INTEGER,
            loudness {real},
            energy {real},
            danceability {real},
            valence {real},
            acousticness {real},
            instrumentalness {real},
            speechiness {real},
            liveness {real})""",
        "CREATE INDEX track_features_tempo ON track_features (tempo)",
        "CREATE INDEX track_features_key ON track_features (key, mode)",
        "CREATE INDEX track_features_energy ON track_features (energy)",
        "CREATE INDEX track_features_danceability ON track_features (danceability)",
    ),
)

#: The audio features a feed can filter by (a range) and sort by, as columns of track_features.
FEATURES = (
    "tempo",
    "loudness",
    "energy",
    "danceability",
    "valence",
    "acousticness",
    "instrumentalness",
    "speechiness",
    "liveness",
)
#: The whole-number features a feed can filter by value.
EXACT_FEATURES = ("key", "mode", "time_signature")

_MIGRATION_LOCK = 0x6D6F6F64  # PostgreSQL advisory lock key of the migrations ("mood")

_DIALECT_TYPES = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL"},
    "postgresql": {"id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "real": "DOUBLE PRECISION"},
}


class CatalogStore:
    """One connection to the store, safe to share between threads (calls are serialised)."""

    def __init__(self, connection: Any, dialect: str, *, migrate_to: int | None = None) -> None:
        self._db = connection
        self.dialect = dialect
        self._lock = threading.Lock()
        self.schema_version = self._migrate(len(MIGRATIONS) if migrate_to is None else migrate_to)

    @classmethod
    def open(cls, url: str, *, migrate_to: int | None = None) -> CatalogStore:
        """Connect to ``url`` and apply pending migrations (up to ``migrate_to``: for tests of
        the migrations themselves)."""
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            except (OSError, sqlite3.Error) as exc:
                raise ConfigError(f"cannot open the SQLite catalog {path}: {exc}") from None
            return cls(db, "sqlite", migrate_to=migrate_to)
        if url.startswith(("postgresql://", "postgres://")):
            import psycopg

            try:
                server = psycopg.connect(url, autocommit=True, connect_timeout=10)
            except psycopg.Error as exc:
                # The message may echo the URL (and its password): name the host only.
                raise ServiceUnavailable(f"the PostgreSQL catalog does not answer: {type(exc).__name__}") from None
            return cls(server, "postgresql", migrate_to=migrate_to)
        raise ConfigError(
            f"the catalog URL must be sqlite:///path.db or postgresql://…, got scheme {url.split(':', 1)[0]!r}"
        )

    # --- writing ----------------------------------------------------------------------------

    def upsert(self, record: dict[str, Any]) -> bool:
        """Store a (schema-valid) v2 or v3 record; True when it inserted or changed a row."""
        key = (record["track_id"], record["model"]["name"], record["model"]["version"])
        text = json.dumps(record, sort_keys=True, separators=(",", ":"))
        with self._transaction() as cur:
            cur.execute(
                self._sql("SELECT record FROM records WHERE track_id = ? AND model_name = ? AND model_version = ?"), key
            )
            row = cur.fetchone()
            if row is not None and _content(json.loads(row[0])) == _content(record):
                return False
            if row is not None:
                # Delete and insert rather than update: the row gets a new seq, which is how
                # neighbour indexes find what changed.
                cur.execute(
                    self._sql("DELETE FROM records WHERE track_id = ? AND model_name = ? AND model_version = ?"), key
                )
            cur.execute(
                self._sql(
                    "INSERT INTO records (track_id, model_name, model_version, processed_at, record) VALUES (?, ?, ?, ?, ?)"
                ),
                (*key, record["processed_at"], text),
            )
            self._refresh_latest(cur, record["track_id"])
        return True

    def _refresh_latest(self, cur: Any, track_id: str) -> None:
        """Make track_latest and track_moods describe the track's newest record."""
        cur.execute(
            self._sql(
                "SELECT seq, processed_at, record FROM records WHERE track_id = ? ORDER BY processed_at DESC, seq DESC LIMIT 1"
            ),
            (track_id,),
        )
        seq, processed_at, text = cur.fetchone()
        record = json.loads(text)
        cur.execute(self._sql("DELETE FROM track_latest WHERE track_id = ?"), (track_id,))
        cur.execute(self._sql("DELETE FROM track_moods WHERE track_id = ?"), (track_id,))
        cur.execute(
            self._sql(
                "INSERT INTO track_latest (track_id, seq, processed_at, valence, arousal, quadrant) VALUES (?, ?, ?, ?, ?, ?)"
            ),
            (track_id, seq, processed_at, record.get("valence"), record.get("arousal"), record.get("quadrant")),
        )
        moods = record.get("moods") or {}
        if moods:
            cur.executemany(
                self._sql("INSERT INTO track_moods (track_id, mood, score) VALUES (?, ?, ?)"),
                [(track_id, mood, float(score)) for mood, score in moods.items()],
            )
        if self.schema_version < 3:  # opened at an older schema (migration tests): no features table
            return
        cur.execute(self._sql("DELETE FROM track_features WHERE track_id = ?"), (track_id,))
        features = record.get("audio_features")
        if features:
            columns = (*FEATURES, *EXACT_FEATURES)
            cur.execute(
                self._sql(
                    f"INSERT INTO track_features (track_id, {', '.join(columns)}) VALUES (?{', ?' * len(columns)})"
                ),
                (track_id, *(features.get(c) for c in columns)),
            )

    # --- reading ----------------------------------------------------------------------------

    def track(self, track_id: str) -> dict[str, Any] | None:
        """The newest record of ``track_id`` (over its models), or None."""
        if not _storable(track_id):
            return None
        rows = self._query(
            "SELECT r.record FROM track_latest l JOIN records r ON r.seq = l.seq WHERE l.track_id = ?", (track_id,)
        )
        return json.loads(rows[0][0]) if rows else None

    def ranked(
        self,
        *,
        mood: str | None = None,
        valence: tuple[float, float] | None = None,
        arousal: tuple[float, float] | None = None,
        quadrant: str | None = None,
        ranges: dict[str, tuple[float, float]] | None = None,
        exact: dict[str, int] | None = None,
        sort: str | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """One summary per track (its newest record), best first: by ``moods[mood]`` when
        ``mood`` is given, by an audio feature when ``sort`` names one (``-energy``: highest
        first), else newest first; optionally within a valence/arousal region ([low, high] in
        [-1, 1]), a quadrant, audio-feature ``ranges`` ({"tempo": (120, 128)}) and ``exact``
        values ({"key": 9, "mode": 0}). Feature names are checked against :data:`FEATURES` and
        :data:`EXACT_FEATURES` (they become column names); values are always parameters."""
        if not (_storable(mood) and _storable(quadrant)):
            return []
        ranges, exact = ranges or {}, exact or {}
        sort_column = (sort or "").lstrip("-")
        unknown = (set(ranges) - set(FEATURES)) | (set(exact) - set(EXACT_FEATURES))
        if sort_column and sort_column not in FEATURES + EXACT_FEATURES:
            unknown.add(sort_column)
        if unknown:
            raise ValueError(f"unknown audio features {sorted(unknown)}")
        where: list[str] = []
        params: list[Any] = []
        for name, (low, high) in ranges.items():
            where.append(f"f.{name} BETWEEN ? AND ?")
            params += [low, high]
        for name, value in exact.items():
            where.append(f"f.{name} = ?")
            params.append(value)
        if valence is not None:
            where.append("l.valence BETWEEN ? AND ?")
            params += list(valence)
        if arousal is not None:
            where.append("l.arousal BETWEEN ? AND ?")
            params += list(arousal)
        if quadrant is not None:
            where.append("l.quadrant = ?")
            params.append(quadrant)
        # Filtering or sorting by a feature keeps only tracks whose record has features.
        features = " JOIN track_features f ON f.track_id = l.track_id" if ranges or exact or sort_column else ""
        if mood is not None:
            sql = f"SELECT r.record, m.score FROM track_moods m JOIN track_latest l ON l.track_id = m.track_id JOIN records r ON r.seq = l.seq{features} WHERE m.mood = ?"
            params.insert(0, mood)
            order = "m.score DESC, l.track_id"
        else:
            sql = f"SELECT r.record, NULL FROM track_latest l JOIN records r ON r.seq = l.seq{features} WHERE 1 = 1"
            order = "l.processed_at DESC, l.track_id"
        if sort_column:
            direction = "DESC" if (sort or "").startswith("-") else "ASC"
            where.append(f"f.{sort_column} IS NOT NULL")
            order = f"f.{sort_column} {direction}, l.track_id"
        sql += "".join(f" AND {w}" for w in where) + f" ORDER BY {order} LIMIT ?"
        rows = self._query(sql, (*params, int(limit)))
        return [summary(json.loads(text), score) for text, score in rows]

    def summaries(self, track_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """track_id -> summary of its newest record, for the ids that are in the catalog."""
        found: dict[str, dict[str, Any]] = {}
        ids = [i for i in dict.fromkeys(track_ids) if _storable(i)]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for (text,) in self._query(
                f"SELECT r.record FROM track_latest l JOIN records r ON r.seq = l.seq WHERE l.track_id IN ({marks})",
                chunk,
            ):
                record = json.loads(text)
                found[record["track_id"]] = summary(record)
        return found

    def changed_since(self, seq: int, *, limit: int = 1000) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
        """Tracks whose newest record changed after row ``seq``: (the last seq returned or
        ``seq``, [(track_id, record)]) in row order; call again until the list is empty."""
        rows = self._query(
            "SELECT l.seq, r.record FROM track_latest l JOIN records r ON r.seq = l.seq WHERE l.seq > ? ORDER BY l.seq LIMIT ?",
            (int(seq), int(limit)),
        )
        if not rows:
            return seq, []
        records = [json.loads(text) for _, text in rows]
        return int(rows[-1][0]), [(record["track_id"], record) for record in records]

    def last_seq(self) -> int:
        """The newest row of track_latest (0 for an empty catalog)."""
        return int(self._query("SELECT COALESCE(MAX(seq), 0) FROM track_latest")[0][0])

    def embeddings(self, network: str) -> Iterator[tuple[str, np.ndarray]]:
        """(track_id, [dim] float32) of every track's newest record that carries ``network``'s
        embedding, in row order."""
        seq = 0
        while True:
            seq, rows = self.changed_since(seq)
            if not rows:
                return
            for track_id, record in rows:
                vector = embedding_of(record, network)
                if vector is not None:
                    yield track_id, vector

    def count(self) -> int:
        """Tracks in the catalog."""
        return int(self._query("SELECT COUNT(*) FROM track_latest")[0][0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- the driver boundary -------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._transaction() as cur:
            cur.execute(self._sql(sql), tuple(params))
            return list(cur.fetchall())

    @contextmanager
    def _transaction(self, *, exclusive: bool = False) -> Iterator[Any]:
        """A transaction on the shared connection; ``exclusive`` takes SQLite's write lock at
        once (PostgreSQL callers lock what they need themselves)."""
        with self._lock, _translated(self.dialect):
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE" if exclusive and self.dialect == "sqlite" else "BEGIN")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def _migrate(self, target: int) -> int:
        types = _DIALECT_TYPES[self.dialect]
        # Replicas starting together migrate one after the other.
        with self._transaction(exclusive=True) as cur:
            if self.dialect == "postgresql":
                cur.execute(self._sql("SELECT pg_advisory_xact_lock(?)"), (_MIGRATION_LOCK,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            current = int(cur.fetchone()[0])
            if current > len(MIGRATIONS):
                raise ConfigError(
                    f"the catalog's schema is version {current}, newer than this release knows ({len(MIGRATIONS)}); upgrade moodstream"
                )
            for version in range(current + 1, target + 1):
                for statement in MIGRATIONS[version - 1]:
                    cur.execute(statement.format(**types))
                cur.execute(
                    self._sql("INSERT INTO schema_migrations (version, applied_at) VALUES (?, CURRENT_TIMESTAMP)"),
                    (version,),
                )
                log.info("catalog migrated to schema version %d", version)
            return max(current, target)


@contextmanager
def _translated(dialect: str) -> Iterator[None]:
    """Driver errors -> the project's: an unreachable store is an outage, not a bug."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise ServiceUnavailable(f"the SQLite catalog failed: {exc}") from None
    except Exception as exc:
        if dialect == "postgresql":
            import psycopg

            if isinstance(exc, psycopg.OperationalError):
                raise ServiceUnavailable(f"the PostgreSQL catalog failed: {type(exc).__name__}: {exc}") from None
        raise


def _storable(text: str | None) -> bool:
    """Whether ``text`` can be a stored key: PostgreSQL's text holds no NUL character (its driver
    refuses to send one), so a value with one is never stored, on either database, and a
    lookup by one finds nothing."""
    return text is None or "\x00" not in text


def _unstorable_keys(record: dict[str, Any]) -> str | None:
    """The first column value of ``record`` that no catalog can store, or None."""
    model = record["model"]
    for name, value in (
        ("track_id", record["track_id"]),
        ("model.name", model["name"]),
        ("model.version", model["version"]),
        ("processed_at", record["processed_at"]),
        ("quadrant", record.get("quadrant")),
        *(("mood names", mood) for mood in record.get("moods") or {}),
    ):
        if isinstance(value, str) and not _storable(value):
            return name
    return None


def _content(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in VOLATILE_FIELDS}


#: The audio features a feed's summary carries (the record has them all).
SUMMARY_FEATURES = ("tempo", "key", "mode", "time_signature", "loudness", "energy", "danceability", "valence")


def summary(record: dict[str, Any], score: float | None = None) -> dict[str, Any]:
    """What a feed needs of a record: ids, title and artist, the mood view, a few audio
    features; no tags, embeddings, beats or sections."""
    features = record.get("audio_features")
    return {
        "track_id": record["track_id"],
        "title": record.get("title"),
        "artist": record.get("artist"),
        "model": {"name": record["model"]["name"], "version": record["model"]["version"]},
        "processed_at": record["processed_at"],
        "duration_s": record.get("duration_s"),
        "leading_mood": record.get("leading_mood"),
        "top_moods": record.get("top_moods", []),
        "moods": record.get("moods", {}),
        "valence": record.get("valence"),
        "arousal": record.get("arousal"),
        "quadrant": record.get("quadrant"),
        "quadrant_probabilities": record.get("quadrant_probabilities"),
        "audio_features": {k: features.get(k) for k in SUMMARY_FEATURES} if features else None,
        "score": None if score is None else round(float(score), 6),
    }


def embedding_of(record: dict[str, Any], network: str) -> np.ndarray | None:
    """[dim] float32 embedding of ``network`` in ``record``, or None when it carries none."""
    found = (record.get("embeddings") or {}).get(network)
    return decode_embedding(found["data"]) if found else None


# --- the consumer of tracks.moods ---------------------------------------------------------------

REFRESH_S = 5.0  # how often an idle replica's index catches up on rows other replicas wrote


async def follow(consumer: Any, catalog: CatalogStore, index: Any | None, *, stop: asyncio.Event) -> None:
    """Store every record of ``tracks.moods`` until ``stop`` is set.

    ``consumer``: a started aiokafka consumer with its own group and ``enable_auto_commit=False``.
    Offsets are committed after the batch's records are stored (at-least-once; duplicates change
    nothing). A record that is not valid JSON or breaks its schema (version 2 or 3) is counted, logged and
    skipped: it can never be stored, and it must not stop the catalog. ``index`` (a
    :class:`pipeline.service.neighbours.NeighbourIndex`) catches up after every batch and every
    :data:`REFRESH_S` otherwise, so it also learns what other replicas stored.
    """
    validators = {}
    for version in (2, 3):
        schema = events.load_schema(f"track_moods.v{version}")
        validators[version] = jsonschema.validators.validator_for(schema)(schema)
    metrics.CATALOG_TRACKS.set(await asyncio.to_thread(catalog.count))
    while not stop.is_set():
        batches = await consumer.getmany(timeout_ms=int(REFRESH_S * 1000))
        for tp, messages in batches.items():
            for message in messages:
                record = _valid(message.value, validators, f"{tp.topic}[{tp.partition}]@{message.offset}")
                if record is None:
                    metrics.CATALOG_RECORDS.labels("rejected").inc()
                    continue
                changed = await asyncio.to_thread(catalog.upsert, record)
                metrics.CATALOG_RECORDS.labels("stored" if changed else "unchanged").inc()
        if batches:
            await consumer.commit()
            metrics.CATALOG_TRACKS.set(await asyncio.to_thread(catalog.count))
        if index is not None:
            await asyncio.to_thread(index.refresh, catalog)
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                metrics.CATALOG_LAG.labels(str(tp.partition)).set(max(0, high - await consumer.position(tp)))


def _valid(value: bytes | None, validators: dict[int, Any], where: str) -> dict[str, Any] | None:
    """The record in ``value`` when it is JSON and valid under the schema of its version (2 or 3:
    a topic holds the previous version's records for a while after an upgrade), else None."""
    try:
        record = json.loads(value or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.warning("catalog: %s is not JSON (%s); skipped", where, exc)
        return None
    version = record.get("schema_version") if isinstance(record, dict) else None
    validator = validators.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
    if validator is None:
        log.warning(
            "catalog: %s is not a tracks.moods record of a version this catalog stores (%s); skipped",
            where,
            sorted(validators),
        )
        return None
    error = jsonschema.exceptions.best_match(validator.iter_errors(record))
    if error is not None:
        log.warning("catalog: %s breaks the tracks.moods v%d schema (%s); skipped", where, version, error.message[:300])
        return None
    unstorable = _unstorable_keys(record)
    if unstorable is not None:
        log.warning("catalog: %s has a NUL character in its %s, which no catalog stores; skipped", where, unstorable)
        return None
    return record
