"""Data sets in their published layouts, the mel cache, and patch targets."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.stages import audio, frontend
from training.data import Track, folders, hash_split
from training.data import cache as cache_module
from training.data import deam as deam_data
from training.data import jamendo as jamendo_data
from training.data.cache import FeatureCache
from training.data.patches import PatchDataset, annotated_starts, mix_frames, serving_patches, step_targets
from training.models.lstm_va import N_STEPS, step_bounds, step_labels


def test_jamendo_reads_the_official_layout(jamendo):
    raw = (jamendo / "data" / "autotagging_moodtheme.tsv").read_bytes()
    assert b"\r\n" in raw and raw.startswith(b"TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS\r\n")
    catalog = jamendo_data.load(jamendo / "data", jamendo / "audio", split=0)
    assert catalog.task == "tags"
    assert catalog.labels == ("calm", "energetic", "happy", "relaxing", "sad")
    assert [len(catalog.splits[s]) for s in ("train", "validation", "test")] == [8, 4, 4]
    first = catalog.splits["train"][0]
    assert first.key == "track_0001000" and first.source.endswith("audio/00/1000.mp3")
    # track 1000 is n == 0: tagged sad and relaxing
    assert [catalog.labels[i] for i in np.flatnonzero(first.target)] == ["relaxing", "sad"]


def test_jamendo_finds_the_low_quality_download(tmp_path):
    (tmp_path / "00").mkdir()
    (tmp_path / "00" / "1000.low.mp3").write_bytes(b"x")
    assert jamendo_data.audio_path(tmp_path, "00/1000.mp3") == tmp_path / "00" / "1000.low.mp3"


def test_jamendo_refuses_another_tsv(tmp_path):
    (tmp_path / "x.tsv").write_text("id\tpath\n1\ta.mp3\n")
    with pytest.raises(ValueError, match="not an MTG-Jamendo TSV"):
        jamendo_data.read_tsv(tmp_path / "x.tsv")


def test_deam_static_reads_both_files_and_scales_to_unit_range(deam):
    raw = next(deam.rglob("static_annotations_averaged_songs_1_2000.csv")).read_text()
    assert raw.startswith("song_id, valence_mean")  # the leading spaces DEAM has
    catalog = deam_data.load_static(deam, 0.2, 0.2)
    tracks = [t for s in catalog.splits.values() for t in s]
    assert catalog.task == "va" and catalog.labels == ("valence", "arousal")
    assert {t.key for t in tracks} == {str(s) for s in list(range(2, 14)) + [2001, 2002]}
    song2 = next(t for t in tracks if t.key == "2")
    np.testing.assert_allclose(song2.target, [(2.0 - 1) / 8, (2.0 - 1) / 8])
    assert all(t.target.min() >= 0 and t.target.max() <= 1 for t in tracks)
    assert all(len(catalog.splits[s]) >= 1 for s in ("train", "validation", "test"))


def test_deam_dynamic_series_start_at_15_s_and_may_end_early(deam):
    series, start = deam_data.read_dynamic(deam)
    assert start == 15.0
    assert {len(v) for v in series.values()} == {7, 8}
    catalog = deam_data.load_dynamic(deam, 0.2, 0.2)
    assert catalog.task == "va_steps" and catalog.labels == tuple(step_labels()) and len(catalog.labels) == 2 * N_STEPS
    assert catalog.labels[:3] == ("valence@0.0s", "arousal@0.0s", "valence@0.5s")


def test_step_targets_interpolate_the_annotations_at_step_centres():
    values = np.stack([np.linspace(0, 0.7, 8), np.full(8, 0.25)], axis=1).astype(np.float32)
    track = Track("1", "x.mp3", values, annotations_start_s=15.0)
    first, last = annotated_starts(track, n_frames=19 * 62.5)
    assert first > 0 and first <= last
    start = int(15.0 * frontend.FRAMES_PER_SECOND)
    target = step_targets(track, start).reshape(N_STEPS, 2)
    centres = (np.array([(a + b) / 2 for a, b in _bounds()]) + start) / frontend.FRAMES_PER_SECOND
    np.testing.assert_allclose(target[:, 0], np.interp(centres, 15.0 + 0.5 * np.arange(8), values[:, 0]), atol=1e-6)
    np.testing.assert_allclose(target[:, 1], 0.25)
    assert step_targets(track, 0) is None  # before the first annotation


def _bounds():
    return step_bounds()


def test_class_folders_and_unlabelled_folders(class_folders, unlabelled):
    catalog = folders.load_classes(class_folders, 0.2, 0.2)
    tracks = [t for s in catalog.splits.values() for t in s]
    assert catalog.labels == ("angry", "happy", "relaxed", "sad") and len(tracks) == 20
    assert all(catalog.labels[int(t.target)] == t.key.split("/")[0] for t in tracks)
    listed = folders.list_unlabelled(str(unlabelled))
    assert len(listed) == 10 and all(t.target is None for t in listed)


def test_hash_split_is_stable_and_proportional():
    keys = [f"t{i}" for i in range(100)]
    split = hash_split(keys, 0.1, 0.2)
    assert split == hash_split(list(reversed(keys)), 0.1, 0.2)
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "validation", "test")}
    assert counts == {"train": 70, "validation": 10, "test": 20}


def test_cache_gives_the_worker_patches_and_computes_once(class_folders, tmp_path):
    path = class_folders / "happy" / "0.mp3"
    cache = FeatureCache(tmp_path)
    patches, _starts = serving_patches(Track("x", str(path)), cache)
    stream = audio.decode(path.read_bytes(), max_duration_s=600)
    expected = frontend.patches_from_chunks(stream.chunks).patches
    np.testing.assert_array_equal(patches, expected)
    cache.flush()
    stored = list(tmp_path.rglob("*.npy"))
    assert len(stored) == 1
    mtime = stored[0].stat().st_mtime_ns
    again = FeatureCache(tmp_path)  # a new run reads the index instead of decoding
    np.testing.assert_array_equal(again.frames(str(path)), cache.frames(str(path)))
    assert stored[0].stat().st_mtime_ns == mtime and len(list(tmp_path.rglob("*.npy"))) == 1


def test_cache_keeps_a_bounded_number_of_maps_open(class_folders, tmp_path, monkeypatch):
    # Each open map holds a file descriptor: a data set larger than the bound must not run out.
    monkeypatch.setattr(cache_module, "OPEN_MAPS", 2)
    sources = [str(p) for p in sorted(class_folders.rglob("*.wav"))[:4]]
    cache = FeatureCache(tmp_path)
    expected = {s: np.array(np.load(cache._path(cache.digest(s)))) for s in sources}
    descriptors = len(os.listdir("/proc/self/fd"))
    for _ in range(2):  # the second round reads maps closed by the first
        for s in sources:
            np.testing.assert_array_equal(cache.patch(s, 1), expected[s][1 : 1 + frontend.PATCH_FRAMES])
    assert len(os.listdir("/proc/self/fd")) <= descriptors + 2


def test_cache_reports_undecodable_files(tmp_path):
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(b"not audio at all" * 100)
    failed = FeatureCache(tmp_path / "cache").prepare([str(bad)], progress=False)
    assert failed[str(bad)].startswith("undecodable")


def test_unlabelled_s3_prefix_is_listed_and_cached(unlabelled, tmp_path, monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for override in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):  # moto answers only AWS's own endpoints
        monkeypatch.delenv(override, raising=False)
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="catalog")
        files = sorted(unlabelled.rglob("*.mp3"))[:3]
        for f in files:
            s3.put_object(Bucket="catalog", Key=f"new/{f.parent.name}/{f.name}", Body=f.read_bytes())
        s3.put_object(Bucket="catalog", Key="new/cover.jpg", Body=b"jpeg")
        tracks = folders.list_unlabelled("s3://catalog/new/", s3_client=s3)
        assert len(tracks) == 3 and all(t.source.startswith("s3://catalog/new/") for t in tracks)
        cache = FeatureCache(tmp_path, s3_client=s3)
        local = FeatureCache(tmp_path)
        for t, f in zip(tracks, sorted(files, key=lambda p: f"{p.parent.name}/{p.name}")):
            np.testing.assert_array_equal(cache.frames(t.source), local.frames(str(f)))


def test_patch_dataset_targets_per_task(deam, mel_cache):
    cache = FeatureCache(mel_cache)
    catalog = deam_data.load_dynamic(deam, 0.2, 0.2)
    ds = PatchDataset(catalog.splits["train"], "va_steps", cache, patches_per_track=2, time_shift=True)
    assert len(ds) > 0
    for i in range(len(ds)):
        mel, target = ds[i]
        assert mel.shape == (frontend.PATCH_FRAMES, frontend.N_MELS) and target.shape == (2 * N_STEPS,)
        assert float(target.min()) >= 0 and float(target.max()) <= 1


def test_mixed_frames_are_the_frames_of_the_mixed_signals():
    """Two tones far apart in frequency, mixed at powers w and 1 - w: mix_frames of their frames
    is the frontend's frames of the mixed wave; a patch mixed with itself is that patch."""
    t = np.arange(3 * frontend.SAMPLE_RATE) / frontend.SAMPLE_RATE
    low, high = (0.5 * np.sin(2 * np.pi * f * t).astype(np.float32) for f in (300.0, 4000.0))
    for weight in (0.2, 0.5, 0.8):
        wave = (np.sqrt(weight) * low + np.sqrt(1 - weight) * high).astype(np.float32)
        expected = frontend.log_mel(wave)
        mixed = mix_frames(frontend.log_mel(low), frontend.log_mel(high), weight)
        # inside the signal: the first and last frames hold the tones' onset and end, clicks
        # whose broadband spectra overlap
        assert np.abs(mixed - expected)[1:-1].max() < 0.01
        # the mix is neither input: each tone's bands carry its weight
        assert np.abs(mixed - frontend.log_mel(low)).max() > 0.1
    frames = frontend.log_mel(low)
    np.testing.assert_allclose(mix_frames(frames, frames, 0.3), frames, atol=1e-4)
