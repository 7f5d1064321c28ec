"""The benchmark harness's stages that need no embedded stack, run on real music (the two
published musicnn clips made into one 100-s track), and the results it writes from them. A
full `make bench` takes a quarter of an hour; these make sure it does not fail at the end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import soundfile

from bench import run

SECONDS = 100.0
PATCHES = 33  # 100 s at 62.5 frames/s, in patches of 187 frames; a trailing partial patch is dropped


@pytest.fixture(scope="module")
def long_clip(example_clips, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "long.opus"
    run._concatenate(example_clips, path, SECONDS)
    return path


def test_concatenated_tracks_have_the_asked_length(long_clip):
    info = soundfile.info(str(long_clip))
    assert info.samplerate == 48_000 and info.channels == 2
    assert info.duration == pytest.approx(SECONDS, abs=0.05)


def test_decode_floor_counts_audio_and_cpu(long_clip):
    floor = run.decode_floor([long_clip])
    assert floor["files"] == 1 and floor["audio_s"] == pytest.approx(SECONDS, abs=0.1)
    assert floor["cpu_s"] > 0 and floor["cpu_s_per_audio_min"] == pytest.approx(
        floor["cpu_s"] / (floor["audio_s"] / 60)
    )


def test_floor_of_several_runs_is_their_mean():
    runs = [
        {"files": 2, "audio_s": 120.0, "cpu_s": 1.0, "cpu_s_per_audio_min": 0.5},
        {"files": 2, "audio_s": 120.0, "cpu_s": 1.2, "cpu_s_per_audio_min": 0.6},
    ]
    floor = run.floor_of(runs)
    assert floor["cpu_s"] == pytest.approx(1.1) and floor["cpu_s_per_audio_min"] == pytest.approx(0.55)
    assert floor["runs_cpu_s"] == [1.0, 1.2] and floor["files"] == 2


def test_analysis_window_compares_each_setting_with_the_whole_track(long_clip):
    window = run.analysis_window([long_clip])
    assert window["tracks"] == 1 and window["whole"]["patches"] == PATCHES
    assert list(window["settings"]) == [f"{n}x{s:g}s" for n, s in run.WINDOW_SETTINGS]
    for (count, excerpt_s), row in zip(run.WINDOW_SETTINGS, window["settings"].values()):
        assert 0 <= row["top5_overlap"] <= 1 and row["max_abs_diff"] >= 0
        if count * excerpt_s < SECONDS:  # excerpts: fewer patches, less CPU
            assert row["patches"] < PATCHES and row["cpu_saving"] > 0
        else:  # the excerpts would cover the track: it is analysed whole, scores unchanged
            assert row["patches"] == PATCHES and row["top5_overlap"] == 1 and row["max_abs_diff"] == 0


def test_peak_rss_is_the_tag_process_own(long_clip):
    rss = run.peak_rss(long_clip, dict(os.environ))
    assert rss["patches"] == PATCHES and rss["duration_s"] == pytest.approx(SECONDS, abs=0.1)
    # A python process with torch and onnxruntime holds a few hundred MB.
    assert 100 < rss["peak_rss_mb"] < 4_000


def _codec_figures(floor: dict, worker_cpu_s: float, e2e: float, rss_60: float, features_s: float = 0.0) -> dict:
    return {
        "decode_floor": floor,
        "worker_triton": {
            "tracks": 1,
            "audio_s": SECONDS,
            "cpu_s": worker_cpu_s,
            "tracks_per_s": 0.3,
            "audio_features_s": features_s,
        },
        "end_to_end": {"tracks_per_s": e2e, "latency_p50_s": 50.0, "latency_p95_s": 80.0},
        "naive": {"tracks_per_s": 0.18, "audio_s": SECONDS, "cpu_s": 10.0},
        "rss": {"3": {"peak_rss_mb": 600.0}, "60": {"peak_rss_mb": rss_60}},
    }


def test_several_rounds_give_the_median_of_their_ratios_and_show_the_median_round():
    floor = {"files": 1, "audio_s": SECONDS, "cpu_s": 1.0, "cpu_s_per_audio_min": 0.6}
    rounds = [
        {**_codec_figures(floor, 1.2, e2e, 690.0), "naive": {"tracks_per_s": naive, "audio_s": SECONDS, "cpu_s": 10.0}}
        for e2e, naive in ((0.36, 0.18), (0.50, 0.20), (0.30, 0.20))
    ]
    figures = {
        **{k: run._median_by([r[k] for r in rounds], "tracks_per_s") for k in ("end_to_end", "naive")},
        "rounds": rounds,
    }
    figures.update(decode_floor=floor, worker_triton=rounds[0]["worker_triton"], rss=rounds[0]["rss"])
    # Per round 2.0, 2.5 and 1.5: the median is 2.0, not the ratio of the median figures (0.36 / 0.20).
    assert run.ratios(figures)["end_to_end_vs_naive"] == pytest.approx(2.0)
    assert figures["end_to_end"]["tracks_per_s"] == 0.36 and figures["naive"]["tracks_per_s"] == 0.20


def test_floor_and_worker_rounds_count_in_the_cpu_ratio_only():
    floor = {"files": 1, "audio_s": SECONDS, "cpu_s": 1.0, "cpu_s_per_audio_min": 0.6}
    full = [_codec_figures(floor, cpu, e2e, 690.0) for cpu, e2e in ((1.25, 0.36), (1.58, 0.54), (1.31, 0.27))]
    cpu_only = [
        {"decode_floor": floor, "worker_triton": {"tracks": 1, "audio_s": SECONDS, "cpu_s": cpu}}
        for cpu in (1.20, 1.22)
    ]
    figures = {"rounds": full + cpu_only, "rss": full[0]["rss"]}
    ratios = run.ratios(figures)
    # CPU: the median of five rounds (1.25, 1.58, 1.31, 1.20, 1.22), where the three full rounds
    # alone would give 1.31; throughput: of the three full rounds (2.0, 3.0, 1.5).
    assert ratios["worker_cpu_vs_decode_floor"] == pytest.approx(1.25)
    assert ratios["end_to_end_vs_naive"] == pytest.approx(2.0)
    results = run.summarise(
        {
            "codecs": {
                "vorbis": {
                    **figures,
                    **{k: full[0][k] for k in ("decode_floor", "worker_triton", "end_to_end", "naive")},
                }
            }
        },
        Path("music"),
    )
    vorbis = results["codecs"]["vorbis"]
    cpu = ["audio_features_vs_worker_cpu", "worker_cpu_vs_decode_floor"]
    assert [sorted(r) for r in vorbis["rounds"]] == [sorted([*cpu, "end_to_end_vs_naive"])] * 3 + [cpu] * 2
    assert "| 1.25 (1.25, 1.58, 1.31, 1.20, 1.22) |" in run.table(
        results
    ) and "| 2.00 (2.00, 3.00, 1.50) |" in run.table(results)


def test_results_hold_the_three_ratios_per_codec_and_the_table_shows_every_figure(long_clip):
    floor = run.floor_of([run.decode_floor([long_clip]), run.decode_floor([long_clip])])
    figures = {
        # The stages below need the embedded stack (make bench runs them); here they are given.
        "codecs": {
            # The audio-features stage's CPU is set against the rest of the worker's, and left
            # out of the worker against the decode floor.
            "opus": _codec_figures(floor, 1.3 * floor["cpu_s"], 0.36, 690.0, features_s=0.1 * floor["cpu_s"]),
            "flac": _codec_figures(floor, 1.7 * floor["cpu_s"], 0.30, 690.0, features_s=0.3 * floor["cpu_s"]),
        },
        "tiers": {
            name: {
                "cpu_ms_per_patch": cpu * 4,
                "worker_onnx": {"tracks": 1, "cpu_s": cpu},
                "end_to_end": {"tracks_per_s": e2e},
                "rss_3min": {"peak_rss_mb": 500.0},
            }
            for name, cpu, e2e in (("musicnn", 9.0, 0.2), ("musicnn_student", 1.0, 1.5))
        },
        "analysis_window": run.analysis_window([long_clip]),
    }
    results = run.summarise(figures, long_clip.parent, "opus")
    opus, flac = results["codecs"]["opus"], results["codecs"]["flac"]
    assert opus["end_to_end_vs_naive"] == pytest.approx(2.0) and flac["end_to_end_vs_naive"] == pytest.approx(30 / 18)
    assert opus["worker_cpu_vs_decode_floor"] == pytest.approx(1.2) and opus["rss_60min_vs_3min"] == pytest.approx(1.15)
    assert opus["audio_features_vs_worker_cpu"] == pytest.approx(0.1 / 1.2)
    assert flac["worker_cpu_vs_decode_floor"] == pytest.approx(1.4)
    assert flac["audio_features_vs_worker_cpu"] == pytest.approx(0.3 / 1.4)
    assert all(opus["met"].values()) and flac["met"] == {
        "end_to_end_vs_naive": False,
        "worker_cpu_vs_decode_floor": False,
        "audio_features_vs_worker_cpu": False,
        "rss_60min_vs_3min": True,
    }
    assert results["goals_met"] is False and set(results["goals"]) == set(opus["met"])
    assert results["machine"]["cores"] == os.cpu_count() and results["date"]
    text = run.table(results)
    for expected in (
        "| opus | ",
        "| flac | ",
        "1.67 ✗",
        "| musicnn_student | 4.00 | 1.00 | 1.500 | 500 |",
        "analysis window",
        "3x15s",
        "goals missed: flac end_to_end_vs_naive, flac worker_cpu_vs_decode_floor, flac audio_features_vs_worker_cpu",
    ):
        assert expected in text


def test_long_tracks_are_made_once_in_each_codec(example_clips, monkeypatch, tmp_path):
    monkeypatch.setattr(run, "CACHE", tmp_path)
    monkeypatch.setattr(run, "LONG_TRACKS_MIN", (0.1,))  # 6 s: the encoding is what is checked
    made = run.long_tracks(example_clips, "mp3")
    again = run.long_tracks(example_clips, "mp3")
    assert made == again and made[0.1].suffix == ".mp3"
    assert soundfile.info(str(made[0.1])).duration == pytest.approx(6.0, abs=0.1)
