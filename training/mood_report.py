"""How the served mood view behaves on real music: ``moodstream-train mood-report DIR...``.

No human mood labels are available, so nothing here is accuracy. What it measures, per folder
set (the reference, or music kept out of calibration):

Without folders it reports on the fetched Debian music of ``role`` (default ``check``: the
packages reserved from calibration and tuning).

- **clear**: share of tracks whose leading mood counts by the rule (``leading_mood.clear``), and
  how the leading moods and quadrants are distributed;
- **agreement of the two networks** where their tags overlap: for each family with members in
  both networks, Spearman's rank correlation over the tracks between the mean calibrated score of
  its MSD members and that of its MTT members (relaxed: chill, Mellow, ... against soft, quiet,
  slow, ...; energetic: party, dance against fast, loud, beat, dance);
- **stability**: whole-track analysis against the analysis window (``excerpts`` x ``excerpt_s``
  seconds, as ``MOODSTREAM_EXCERPTS`` does): same leading mood, same quadrant, |delta| of valence
  and arousal, rank correlation of each axis;
- **spread** of each family's calibrated score (10th / 50th / 90th percentile, standard
  deviation): on the reference it is uniform by construction; on other music it shows whether
  the scale still separates tracks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from pipeline.contracts.model_meta import read_meta
from pipeline.stages.frontend import PATCH_SECONDS
from pipeline.stages.scoring import OnnxScorer
from pipeline.stages.taxonomy import DEFAULT_MOODS_FILE, Taxonomy, cdf, family_scores, load_taxonomy, mood_view
from training.calibrate import DEFAULT_MAX_DURATION_S, TrackSet, reference_files, score_tracks


def _views(taxonomy: Taxonomy, tracks: TrackSet) -> list:
    return [mood_view(taxonomy, {n: s[i] for n, s in tracks.scores.items()}) for i in range(len(tracks.files))]


def network_agreement(taxonomy: Taxonomy, tracks: TrackSet) -> dict[str, dict[str, Any]]:
    """Family -> Spearman rho between its members of each network (families in both only)."""
    out = {}
    for family in taxonomy.families:
        by_network: dict[str, list] = {}
        for m in family.members:
            by_network.setdefault(m.network, []).append(
                cdf(taxonomy.calibration.tags[m.key], tracks.scores[m.network][:, m.column])
            )
        if len(by_network) < 2:
            continue
        (a, xs), (b, ys) = list(by_network.items())[:2]
        rho = spearmanr(np.mean(xs, axis=0), np.mean(ys, axis=0)).statistic
        tags = {n: [m.tag for m in family.members if m.network == n] for n in (a, b)}
        out[family.name] = {"spearman": round(float(rho), 3), "members": tags}
    return out


def report(
    folders: list[Path],
    model: str,
    repository: Path,
    *,
    cache_dir: Path | None,
    role: str = "check",
    excerpts: int = 5,
    excerpt_s: float = 15.0,
    moods_file: Path = DEFAULT_MOODS_FILE,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
) -> dict[str, Any]:
    files = reference_files(folders, role=role)
    taxonomy = load_taxonomy(read_meta(repository, model), moods_file)
    scorer = OnnxScorer(repository, model, threads=1)
    whole = score_tracks(files, scorer, cache_dir=cache_dir, max_duration_s=max_duration_s)
    window = score_tracks(
        [Path(f) for f in whole.files],
        scorer,
        cache_dir=cache_dir,
        max_duration_s=max_duration_s,
        excerpts=excerpts,
        excerpt_s=excerpt_s,
    )
    views, windowed = _views(taxonomy, whole), _views(taxonomy, window)
    n = len(views)
    leading = [v.leading_mood["mood"] for v in views]
    valence = np.array([v.valence for v in views])
    arousal = np.array([v.arousal for v in views])
    w_valence = np.array([v.valence for v in windowed])
    w_arousal = np.array([v.arousal for v in windowed])
    scores = family_scores(taxonomy, whole.scores)
    longer = whole.patches * PATCH_SECONDS > excerpts * excerpt_s  # where the window differs from the whole
    return {
        "tracks": n,
        "minutes_analysed": round(float(whole.patches.sum() * PATCH_SECONDS / 60), 1),
        "clear_share": round(sum(v.leading_mood["clear"] for v in views) / n, 3),
        "leading_moods": {m: leading.count(m) for m in sorted(set(leading))},
        "quadrants": {q: sum(v.quadrant == q for v in views) for q in ("happy", "angry", "sad", "relaxed")},
        "network_agreement": network_agreement(taxonomy, whole),
        "stability": {
            "window": f"{excerpts} x {excerpt_s:g} s",
            "tracks_longer_than_window": int(longer.sum()),
            "same_leading_mood": round(
                float(np.mean([a.leading_mood["mood"] == b.leading_mood["mood"] for a, b in zip(views, windowed)])), 3
            ),
            "same_quadrant": round(float(np.mean([a.quadrant == b.quadrant for a, b in zip(views, windowed)])), 3),
            "valence_abs_delta_median": round(float(np.median(np.abs(valence - w_valence))), 3),
            "arousal_abs_delta_median": round(float(np.median(np.abs(arousal - w_arousal))), 3),
            "valence_spearman": round(float(spearmanr(valence, w_valence).statistic), 3),
            "arousal_spearman": round(float(spearmanr(arousal, w_arousal).statistic), 3),
        },
        "spread": {
            f.name: {
                "p10": round(float(np.percentile(scores[:, i], 10)), 3),
                "p50": round(float(np.percentile(scores[:, i], 50)), 3),
                "p90": round(float(np.percentile(scores[:, i], 90)), 3),
                "std": round(float(scores[:, i].std()), 3),
            }
            for i, f in enumerate(taxonomy.families)
        },
        "valence": {
            "p10": round(float(np.percentile(valence, 10)), 3),
            "p90": round(float(np.percentile(valence, 90)), 3),
        },
        "arousal": {
            "p10": round(float(np.percentile(arousal, 10)), 3),
            "p90": round(float(np.percentile(arousal, 90)), 3),
        },
    }


def as_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"tracks {result['tracks']} ({result['minutes_analysed']} min); leading mood clear: {result['clear_share']:.1%}",
        f"leading moods {json.dumps(result['leading_moods'])}; quadrants {json.dumps(result['quadrants'])}",
        "",
        "| family | network agreement (Spearman) | p10 | p50 | p90 | std |",
        "|---|---|---|---|---|---|",
    ]
    for family, spread in result["spread"].items():
        rho = result["network_agreement"].get(family, {}).get("spearman")
        lines.append(
            f"| {family} | {'' if rho is None else rho} | {spread['p10']} | {spread['p50']} | {spread['p90']} | {spread['std']} |"
        )
    s = result["stability"]
    lines += [
        "",
        f"whole track vs {s['window']}: same leading mood {s['same_leading_mood']:.1%}, same quadrant {s['same_quadrant']:.1%}, "
        f"median |Δvalence| {s['valence_abs_delta_median']}, |Δarousal| {s['arousal_abs_delta_median']}, "
        f"Spearman valence {s['valence_spearman']}, arousal {s['arousal_spearman']} ({s['tracks_longer_than_window']} tracks longer than the window)",
    ]
    return "\n".join(lines)
