"""From per-patch network outputs to the mood view of a track.

Three sources can fill the mood fields, chosen by what the served model's networks are:

``tags`` (musicnn and any tag model with sections in ``moods.toml``)
    track score of a tag  = mean of that tag over the track's patches
    calibrated tag score  = share of the reference music whose track score is lower (the
                            empirical CDF of the tag over the reference set, from its quantiles)
    family raw score      = weighted mean of its member tags' calibrated scores; members may
                            come from several networks (relaxed: MSD chill, Mellow, ...; MTT
                            soft, quiet, slow, ...)
    family score (moods)  = share of the reference music whose family raw score is lower, so
                            every family is on the same 0-1 scale: 0.9 means "shows this mood
                            more than 90 % of music in general"
    top_moods             = families scoring >= ``[rule] present``, strongest first
    leading_mood          = the strongest family; ``clear`` when it is in top_moods, and a
                            track whose every family is below the bar is said to be unclear
    valence, arousal      = weighted means of (2 * family score - 1) by ``[plane]`` (in [-1, 1])
``valence_arousal`` (a network trained on DEAM, task va or va_steps)
    valence, arousal      = the network's outputs, served in [0, 1], mapped to [-1, 1]
``classes`` (a network trained on the four quadrant classes)
    moods                 = the class probabilities; valence and arousal their expectation

In every source the quadrant is happy (valence >= 0, arousal >= 0), angry (< 0, >= 0),
sad (< 0, < 0) or relaxed (>= 0, < 0). The families, their members and weights, the rule and the
plane are data (``moods.toml``); the calibration travels with the model (its config's
``moodstream_calibration`` parameter, written by ``moodstream-train calibrate-moods``).
"""

from __future__ import annotations

import base64
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contracts.model_meta import ModelMeta, Network
from pipeline.errors import ConfigError
from pipeline.stages.frontend import PATCH_SECONDS
from pipeline.stages.heads import Heads

#: The mood rules shipped with the package (package data, read through importlib.resources).
DEFAULT_MOODS_FILE = Path(str(resources.files(__package__).joinpath("moods.toml")))
QUADRANTS = ("happy", "angry", "sad", "relaxed")
#: mood source -> how the fields were derived (the output's ``mood_source``)
SOURCES = ("tags", "valence_arousal", "classes", "none")
EMBEDDING_DTYPE = np.dtype("<f2")  # little-endian float16 in the output's base64


@dataclass(frozen=True)
class Member:
    network: str
    tag: str
    column: int  # index into that network's scores
    weight: float

    @property
    def key(self) -> str:
        return f"{self.network}:{self.tag}"


@dataclass(frozen=True)
class Family:
    name: str
    members: tuple[Member, ...]


@dataclass(frozen=True)
class Rule:
    present: float  # tags: calibrated family score at which a family counts (top_moods)
    probable: float  # heads: family probability at which a family counts
    class_clear: float  # classes: class probability at which the leading class counts
    va_clear: float  # valence_arousal: distance from the nearer axis at which the quadrant counts


@dataclass(frozen=True)
class Plane:
    valence: dict[str, float]  # family -> weight
    arousal: dict[str, float]


@dataclass(frozen=True)
class Calibration:
    """Reference quantiles at levels 0, 1/(Q-1), ..., 1 of track scores over real music."""

    tags: dict[str, np.ndarray]  # member key "network:tag" -> [Q] quantiles of its track score
    families: dict[str, np.ndarray]  # family -> [Q] quantiles of its raw score
    tracks: int  # reference tracks the quantiles come from

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Calibration:
        return cls(
            tags={k: np.asarray(v, np.float64) for k, v in doc["tags"].items()},
            families={k: np.asarray(v, np.float64) for k, v in doc["families"].items()},
            tracks=int(doc["tracks"]),
        )


@dataclass(frozen=True)
class Taxonomy:
    model: str
    networks: tuple[Network, ...]
    source: str  # one of SOURCES
    families: tuple[Family, ...]  # empty unless source == "tags"
    rule: Rule
    plane: Plane
    calibration: Calibration | None  # required for source "tags" (None while calibrating)
    heads: Heads | None = None  # learned from human labels: when present, they fill the mood fields


def load_taxonomy(meta: ModelMeta, path: Path | None = None, *, calibrated: bool = True) -> Taxonomy:
    """The mood rules for ``meta``'s networks from ``path`` (None: :data:`DEFAULT_MOODS_FILE`);
    ConfigError names what is wrong.

    ``calibrated=False`` builds the families without a calibration (for calibrate-moods).
    """
    path = path or DEFAULT_MOODS_FILE
    try:
        doc: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"mood file {path}: {exc}") from None
    known = doc.get("families", {})
    try:
        rule = Rule(**{k: float(doc["rule"][k]) for k in ("present", "probable", "class_clear", "va_clear")})
        plane = Plane(valence=dict(doc["plane"]["valence"]), arousal=dict(doc["plane"]["arousal"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{path}: [rule] needs present, probable, class_clear and va_clear, [plane] needs valence and arousal ({exc!r})"
        ) from None
    for axis, weights in (("valence", plane.valence), ("arousal", plane.arousal)):
        unknown = sorted(set(weights) - set(known))
        if unknown or not weights:
            raise ConfigError(f"{path}: [plane] {axis} must weigh declared families, got unknown {unknown}")

    members: dict[str, list[Member]] = {}
    for network in meta.networks:
        index = {label: i for i, label in enumerate(network.labels)}
        for family, tags in doc.get(network.name, {}).items():
            if family not in known:
                raise ConfigError(f"{path}: [{network.name}.{family}] is not declared under [families]")
            missing = [tag for tag in tags if tag not in index]
            if missing:
                raise ConfigError(f"{path}: [{network.name}.{family}] names tags the network lacks: {missing}")
            members.setdefault(family, []).extend(
                Member(network.name, tag, index[tag], float(w)) for tag, w in tags.items()
            )
    families = tuple(Family(name, tuple(ms)) for name, ms in members.items())
    source = _source(meta, bool(families))
    if source != "tags":
        families = ()
    calibration = None
    if source == "tags" and calibrated:
        if not meta.calibration:
            raise ConfigError(
                f"model {meta.name} has mood families in {path} but no mood calibration in its config; "
                f"run `moodstream-train calibrate-moods --model {meta.name} --write` on reference music"
            )
        calibration = Calibration.from_json(meta.calibration)
        lacking = sorted({m.key for f in families for m in f.members} - set(calibration.tags)) + sorted(
            {f.name for f in families} - set(calibration.families)
        )
        if lacking:
            raise ConfigError(
                f"model {meta.name}: its calibration lacks {lacking}; calibrate it again after editing {path}"
            )
    heads = None
    if meta.heads:
        dims = {n.name: (len(n.labels), n.embedding_dim) for n in meta.networks}
        heads = Heads.from_json(meta.heads, dims)
    return Taxonomy(meta.name, meta.networks, source, families, rule, plane, calibration, heads)


def _source(meta: ModelMeta, has_families: bool) -> str:
    tasks = {n.task for n in meta.networks}
    if tasks & {"va", "va_steps"}:
        return "valence_arousal"
    if any(n.task == "classes" and set(QUADRANTS) <= set(n.labels) for n in meta.networks):
        return "classes"
    return "tags" if has_families else "none"


# --- calibration ------------------------------------------------------------------------------


def cdf(quantiles: np.ndarray, x: np.ndarray | float) -> np.ndarray:
    """Share of the reference below ``x``, from its quantiles [Q] at levels 0..1.

    Linear between quantiles; where several quantiles equal ``x`` (a tag the reference often
    scores 0), the middle of their levels, so ties land where the reference's own ties do.
    """
    q = np.asarray(quantiles, np.float64)
    x = np.asarray(x, np.float64)
    levels = _levels(len(q))
    left = np.searchsorted(q, x, side="left")
    right = np.searchsorted(q, x, side="right")
    tied = (right - left) > 0
    mid = (left + right - 1) / 2 / (len(q) - 1)
    return np.clip(np.where(tied, mid, np.interp(x, q, levels)), 0.0, 1.0)


@lru_cache(maxsize=8)
def _levels(n: int) -> np.ndarray:
    """[n] evenly spaced quantile levels 0..1 (read-only: shared between calls)."""
    levels = np.linspace(0.0, 1.0, n)
    levels.flags.writeable = False
    return levels


def _calibration(taxonomy: Taxonomy) -> Calibration:
    if taxonomy.calibration is None:
        raise ConfigError(f"model {taxonomy.model}: its mood families need a calibration")
    return taxonomy.calibration


def family_raw(taxonomy: Taxonomy, track: dict[str, np.ndarray]) -> np.ndarray:
    """track: network -> [..., n_labels] track scores -> [..., n_families] raw family scores."""
    cal = _calibration(taxonomy)
    out = []
    for family in taxonomy.families:
        weights = np.array([m.weight for m in family.members])
        parts = np.stack([cdf(cal.tags[m.key], track[m.network][..., m.column]) for m in family.members], axis=-1)
        out.append((parts * weights).sum(axis=-1) / weights.sum())
    return np.stack(out, axis=-1)


def family_scores(taxonomy: Taxonomy, track: dict[str, np.ndarray]) -> np.ndarray:
    """track: network -> [..., n_labels] -> [..., n_families] calibrated family scores in [0, 1]."""
    raw = family_raw(taxonomy, track)
    return np.stack(
        [cdf(_calibration(taxonomy).families[f.name], raw[..., i]) for i, f in enumerate(taxonomy.families)], axis=-1
    )


# --- the mood view ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MoodView:
    """The mood fields of one track (or one timeline segment, without tags and embeddings)."""

    moods: dict[str, float]  # family (or quadrant class) -> score in [0, 1]
    top_moods: list[dict[str, float | str]]  # [{mood, score}] that count, strongest first
    leading_mood: dict[str, Any]  # {mood, confidence, clear}
    valence: float  # [-1, 1]
    arousal: float  # [-1, 1]
    quadrant: str  # one of QUADRANTS
    quadrant_probabilities: dict[str, float] | None = None  # P(each quadrant), when the source gives them


def quadrant(valence: float, arousal: float) -> str:
    if arousal >= 0:
        return "happy" if valence >= 0 else "angry"
    return "relaxed" if valence >= 0 else "sad"


def _r(x: float) -> float:
    return round(float(x), 6)


def mood_view(taxonomy: Taxonomy, track: dict[str, np.ndarray], top_n: int = 3) -> MoodView:
    """track: network -> [n_labels] track scores (means over patches) -> the mood fields."""
    return mood_views(taxonomy, {name: np.asarray(v)[None] for name, v in track.items()}, top_n)[0]


def mood_views(taxonomy: Taxonomy, rows: dict[str, np.ndarray], top_n: int = 3) -> list[MoodView]:
    """rows: network -> [m, n_labels] scores (a track and its segments) -> m mood views. The
    calibration's curves run once over all rows, not once per row (a track's timeline has a
    row every 30 s)."""
    n_rows = len(next(iter(rows.values())))
    scores = family_scores(taxonomy, rows) if taxonomy.source == "tags" else None
    return [
        _mood_view(taxonomy, {name: v[i] for name, v in rows.items()}, None if scores is None else scores[i], top_n)
        for i in range(n_rows)
    ]


def _mood_view(taxonomy: Taxonomy, track: dict[str, np.ndarray], scores: np.ndarray | None, top_n: int) -> MoodView:
    if taxonomy.source == "tags" and scores is not None:
        moods = {f.name: _r(s) for f, s in zip(taxonomy.families, scores)}
        ranked = sorted(moods.items(), key=lambda kv: (-kv[1], kv[0]))
        top: list[dict[str, float | str]] = [_ranked(m, s) for m, s in ranked if s >= taxonomy.rule.present][:top_n]
        leader, confidence = ranked[0]
        valence = _axis(taxonomy.plane.valence, moods)
        arousal = _axis(taxonomy.plane.arousal, moods)
        return MoodView(
            moods,
            top,
            {"mood": leader, "confidence": confidence, "clear": bool(top)},
            valence,
            arousal,
            quadrant(valence, arousal),
        )
    if taxonomy.source == "valence_arousal":
        network = next(n for n in taxonomy.networks if n.task in ("va", "va_steps"))
        values = track[network.name]
        valence = _r(2 * np.mean([v for label, v in zip(network.labels, values) if label.startswith("valence")]) - 1)
        arousal = _r(2 * np.mean([v for label, v in zip(network.labels, values) if label.startswith("arousal")]) - 1)
        # The quadrant is as sure as the point is far from the nearer axis.
        confidence = _r(min(1.0, min(abs(valence), abs(arousal))))
        name = quadrant(valence, arousal)
        clear = confidence >= taxonomy.rule.va_clear
        return MoodView(
            {},
            [{"mood": name, "score": confidence}] if clear else [],
            {"mood": name, "confidence": confidence, "clear": clear},
            valence,
            arousal,
            name,
        )
    if taxonomy.source == "classes":
        network = next(n for n in taxonomy.networks if n.task == "classes" and set(QUADRANTS) <= set(n.labels))
        probs = {label: float(p) for label, p in zip(network.labels, track[network.name]) if label in QUADRANTS}
        total = sum(probs.values()) or 1.0
        p = {k: v / total for k, v in probs.items()}
        valence = _r(p["happy"] + p["relaxed"] - p["angry"] - p["sad"])
        arousal = _r(p["happy"] + p["angry"] - p["sad"] - p["relaxed"])
        moods = {k: _r(v) for k, v in probs.items()}
        leader = max(QUADRANTS, key=lambda k: moods[k])
        clear = moods[leader] >= taxonomy.rule.class_clear
        return MoodView(
            moods,
            [{"mood": leader, "score": moods[leader]}] if clear else [],
            {"mood": leader, "confidence": moods[leader], "clear": clear},
            valence,
            arousal,
            leader,
            {k: _r(v) for k, v in p.items()},
        )
    return MoodView({}, [], {"mood": None, "confidence": 0.0, "clear": False}, 0.0, 0.0, quadrant(0.0, 0.0))


def _ranked(mood: str, score: float) -> dict[str, float | str]:
    return {"mood": mood, "score": score}


def _axis(weights: dict[str, float], moods: dict[str, float]) -> float:
    used = {f: w for f, w in weights.items() if f in moods}
    total = sum(abs(w) for w in used.values())
    return _r(sum(w * (2 * moods[f] - 1) for f, w in used.items()) / total) if total else 0.0


def encode_embedding(vector: np.ndarray) -> str:
    """[dim] float -> base64 of little-endian float16."""
    return base64.b64encode(np.asarray(vector, np.float32).astype(EMBEDDING_DTYPE).tobytes()).decode("ascii")


def decode_embedding(data: str) -> np.ndarray:
    """The inverse of :func:`encode_embedding`: [dim] float32."""
    return np.frombuffer(base64.b64decode(data), EMBEDDING_DTYPE).astype(np.float32)


def summarise(
    outputs: dict[str, Any],
    taxonomy: Taxonomy,
    *,
    patch_starts_s: np.ndarray,
    top_n: int = 3,
    top_tags: int = 10,
    segment_s: float = 30.0,
    embeddings: bool = True,
) -> dict[str, Any]:
    """outputs: network -> NetworkOutput with scores [n_patches, n_labels] and embedding
    [n_patches, dim]; patch_starts_s: [n_patches] seconds -> the mood fields of an output."""
    first = next(iter(outputs.values()))
    if len(first.scores) == 0:
        raise ValueError("a track needs at least one patch")
    track = {name: out.scores.mean(axis=0) for name, out in outputs.items()}
    labels = {n.name: n.labels for n in taxonomy.networks}
    tags = {name: {label: _r(s) for label, s in zip(labels[name], scores)} for name, scores in track.items()}
    ranked_tags = {
        name: [
            {"tag": labels[name][i], "score": tags[name][labels[name][i]]}
            for i in np.argsort(-scores, kind="stable")[:top_tags]
        ]
        for name, scores in track.items()
    }
    segment = np.floor(patch_starts_s / segment_s).astype(int)
    segments = np.unique(segment)
    in_segment = [segment == seg for seg in segments]
    rows = {
        name: np.stack([track[name], *(out.scores[r].mean(axis=0) for r in in_segment)])
        for name, out in outputs.items()
    }
    tagged = mood_views(taxonomy, rows, top_n)  # [track, *segments]
    views = tagged if taxonomy.heads is None else heads_views(taxonomy, taxonomy.heads, outputs, in_segment, top_n)
    percentiles = [v.moods if taxonomy.source == "tags" else {} for v in tagged]
    view, *parts = views
    timeline = []
    for seg, r, part in zip(segments, in_segment, parts):
        timeline.append(
            {
                "start_s": round(float(seg * segment_s), 3),
                "end_s": round(float(patch_starts_s[r].max() + PATCH_SECONDS), 3),
                "moods": part.moods,
                "top_moods": part.top_moods,
                "leading_mood": part.leading_mood,
                "valence": part.valence,
                "arousal": part.arousal,
                "quadrant": part.quadrant,
                "quadrant_probabilities": part.quadrant_probabilities,
            }
        )
    return {
        "tags": tags,
        "top_tags": ranked_tags,
        "mood_source": "heads" if taxonomy.heads is not None else taxonomy.source,
        "moods": view.moods,
        "top_moods": view.top_moods,
        "leading_mood": view.leading_mood,
        "valence": view.valence,
        "arousal": view.arousal,
        "quadrant": view.quadrant,
        "quadrant_probabilities": view.quadrant_probabilities,
        "mood_percentiles": percentiles[0],
        "timeline": timeline,
        "embeddings": {
            name: {
                "dim": int(out.embedding.shape[1]),
                "dtype": "float16",
                "data": encode_embedding(out.embedding.mean(axis=0)),
            }
            for name, out in outputs.items()
        }
        if embeddings
        else {},
    }


def heads_views(
    taxonomy: Taxonomy, heads: Heads, outputs: dict[str, Any], in_segment: list[np.ndarray], top_n: int
) -> list[MoodView]:
    """The mood views of a track and its segments from the heads: [track, *segments].

    The heads run on each segment's patches; the track's probabilities are the patch-weighted
    mean of its segments' (``track`` "segments", as heads learned on clips of a segment's length
    are applied) or the heads on all its patches (``track`` "whole")."""
    everything = np.ones(len(in_segment[0]), bool)
    quadrants, families = heads.predict(outputs, [everything, *in_segment])
    if heads.track == "segments":
        weights = np.array([r.sum() for r in in_segment], np.float64)
        quadrants[0] = weights @ quadrants[1:] / weights.sum()
        if families is not None:
            families[0] = weights @ families[1:] / weights.sum()
    labels = heads.families.labels if heads.families is not None else ()
    return [
        _heads_view(taxonomy, q, families[i] if families is not None else None, labels, top_n)
        for i, q in enumerate(quadrants)
    ]


def _heads_view(
    taxonomy: Taxonomy, q: np.ndarray, families: np.ndarray | None, labels: tuple[str, ...], top_n: int
) -> MoodView:
    """q: [4] quadrant probabilities; families: [F] family probabilities (or None)."""
    probabilities = {name: _r(v) for name, v in zip(QUADRANTS, q)}
    p = dict(zip(QUADRANTS, q))
    valence = _r(p["happy"] + p["relaxed"] - p["angry"] - p["sad"])
    arousal = _r(p["happy"] + p["angry"] - p["sad"] - p["relaxed"])
    leader_quadrant = QUADRANTS[int(np.argmax(q))]
    if families is None:
        # Without family heads, the quadrant is the mood (its four names are the quadrants').
        moods, ranked = probabilities, sorted(probabilities.items(), key=lambda kv: (-kv[1], kv[0]))
    else:
        moods = {name: _r(v) for name, v in zip(labels, families)}
        ranked = sorted(moods.items(), key=lambda kv: (-kv[1], kv[0]))
    top = [_ranked(m, s) for m, s in ranked if s >= taxonomy.rule.probable][:top_n]
    leader, confidence = ranked[0]
    return MoodView(
        moods,
        top,
        {"mood": leader, "confidence": confidence, "clear": confidence >= taxonomy.rule.probable},
        valence,
        arousal,
        leader_quadrant,
        probabilities,
    )


def mood_line(record: dict) -> str:
    """One line saying a record's leading mood, its other moods and its place on the mood plane."""
    lead = record["leading_mood"]
    if lead["mood"] is None:
        return "moods: this model has no mood families or mood outputs (pipeline/stages/moods.toml); tags only"
    others = ", ".join(f"{m['mood']} {m['score']:.2f}" for m in record["top_moods"][1:])
    plane = f"valence {record['valence']:+.2f}, arousal {record['arousal']:+.2f} ({record['quadrant']})"
    if lead["clear"]:
        return (
            f"mood: {lead['mood']} (confidence {lead['confidence']:.2f}){'; also ' + others if others else ''}; {plane}"
        )
    return f"mood: unclear (no mood stands out; strongest {lead['mood']} {lead['confidence']:.2f}); {plane}"
