"""Distillation: a student learns a served teacher's outputs on unlabelled music and is served
in its place."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_dims import TINY_DIMS

from pipeline.contracts.model_meta import read_meta
from pipeline.settings import DEFAULT_MODEL_REPOSITORY
from pipeline.stages.frontend import N_MELS, PATCH_FRAMES
from pipeline.stages.scoring import OnnxScorer
from pipeline.stages.taxonomy import load_taxonomy, mood_view
from training import REPO_ROOT
from training.cli import main
from training.config import from_dict
from training.data import Track, debian_music
from training.data.cache import FeatureCache
from training.data.patches import mix_frames
from training.distill.agreement import NEAR_TIE, compare, mood_agreement
from training.distill.data import (
    MIX_WEIGHTS,
    MixedPatches,
    TeacherPatches,
    distillation_set,
    mood_tag_weights,
    split_by_group,
    teacher_logits,
    teacher_targets,
)
from training.distill.teacher import TEACHER_HOP, Teacher, patch_starts, teacher_outputs
from training.engine import DistillLoss
from training.models import build, load_checkpoint

#: The shipped CPU tier (musicnn's networks pruned, made from the teacher's checkpoints, filters
#: frozen) and the small trunk trained from scratch.
STUDENTS = {
    "musicnn_student": (
        {"channels": [[4, 4, 2, 2, 2], [4, 4, 2, 2, 2]], "frontend_stride": [2, 2]},
        {
            "teacher_checkpoints": ["training/weights/musicnn_msd.pt", "training/weights/musicnn_mtt.pt"],
            "frozen_filters": True,
        },
    ),
    "separable_student": (TINY_DIMS["separable_student"], {}),
}


def _distill_args(source, repository, out, arch, cache, **extra):
    dims, arch_options = STUDENTS[arch]
    args = ["distill", str(source), "--repository", str(repository), "--export"]
    options = {
        "arch": arch,
        "name": "musicnn_student",
        "version": "student-test",
        "epochs": 2,
        "batch_size": 8,
        "cache_dir": str(cache),
        "out_dir": str(out),
        "progress": False,
        "teacher_workers": 1,
    }
    options |= (
        {
            "validation_groups": ["album0"],
            "holdout_groups": ["album1"],
            "time_shift": False,
            "freq_masks": 0,
            "time_masks": 0,
        }
        | arch_options
        | extra
    )
    args += [a for k, v in options.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    return args + [a for k, v in dims.items() for a in ("--set", f"dims.{k}={json.dumps(v)}")]


@pytest.mark.parametrize("arch", sorted(STUDENTS))
def test_distill_exports_a_calibrated_student_with_the_teachers_outputs(
    unlabelled, mel_cache, repository, tmp_path, arch
):
    out = tmp_path / "student"
    assert main(_distill_args(unlabelled, repository, out, arch, mel_cache)) == 0
    report = json.loads((out / "distill_report.json").read_text())
    assert report["groups"] == {"train": ["album2"], "validation": ["album0"], "test": ["album1"]}
    assert report["tracks"] == {"train": 3, "validation": 4, "test": 3} and report["epochs_run"] == 2
    # every training track gives its grid patches and the ones halfway between
    assert report["patches"]["train"] > report["patches"]["held_out"]
    for key in ("roc_auc_median", "spearman_track", "top5_overlap_track", "pearson_r"):
        assert np.isfinite(report["held_out"][key]), key
    assert 0 <= report["moods_held_out"]["leading_mood_same"] <= 1 and report["moods_held_out"]["tracks"] == 3
    assert "check" not in report  # the reserved packages are only scored when training on Debian's music

    teacher = read_meta(repository, "musicnn")
    student = read_meta(repository, "musicnn_student")
    assert [(n.name, n.labels, n.embedding_dim) for n in student.networks] == [
        (n.name, n.labels, n.embedding_dim) for n in teacher.networks
    ]
    assert {n.version for n in student.networks} == {"student-test"} and student.outputs == teacher.outputs
    # moods.toml's musicnn sections apply, with the student's own calibration
    taxonomy = load_taxonomy(student)
    assert taxonomy.source == "tags" and taxonomy.calibration.tracks == 10
    outputs = OnnxScorer(repository, "musicnn_student").score_sync(
        np.random.default_rng(0).random((3, PATCH_FRAMES, N_MELS), np.float32)
    )
    assert {k: (v.scores.shape, v.embedding.shape) for k, v in outputs.items()} == {
        "musicnn_msd": ((3, 50), (3, 200)),
        "musicnn_mtt": ((3, 50), (3, 200)),
    }
    # the served graph is the checkpoint's: the second network's scores are the logits' second half
    model, _ = load_checkpoint(out / "best.pt")
    x = np.random.default_rng(1).random((2, PATCH_FRAMES, N_MELS), np.float32)
    with torch.inference_mode():
        logits, embedding = model(torch.from_numpy(x))
    served = OnnxScorer(repository, "musicnn_student").score_sync(x)
    np.testing.assert_allclose(served["musicnn_mtt"].scores, torch.sigmoid(logits[:, 50:]).numpy(), atol=1e-5)
    np.testing.assert_allclose(served["musicnn_mtt"].embedding, embedding[:, 200:].numpy(), atol=1e-5)

    # `agreement` scores the served graph on the same held-out tracks without training: the
    # report's figures again (the graph is the checkpoint's to float rounding, which can reorder
    # the near-equal scores of a 2-epoch student on 3 tracks: a ROC-AUC moved by 0.002).
    agreement_args = [
        a if a != "distill" else "agreement"
        for a in _distill_args(unlabelled, repository, out, arch, mel_cache)
        if a != "--export"
    ]
    assert main([*agreement_args, "--out", str(tmp_path / "agreement.json")]) == 0
    again = json.loads((tmp_path / "agreement.json").read_text())
    assert again["student"]["name"] == "musicnn_student" and again["held_out"]["tracks"] == 3
    for key in ("roc_auc_median", "spearman_track", "top5_overlap_track"):
        assert again["held_out"][key] == pytest.approx(report["held_out"][key], abs=0.01), key
    assert again["moods_held_out"]["leading_mood_same"] == report["moods_held_out"]["leading_mood_same"]


def test_agreement_refuses_a_student_the_repository_lacks(repository, tmp_path):
    with pytest.raises(SystemExit, match="no student 'nobody'"):
        main(
            [
                "agreement",
                "--repository",
                str(repository),
                "--set",
                'name="nobody"',
                "--set",
                f"out_dir={json.dumps(str(tmp_path))}",
            ]
        )


def test_a_refit_trains_on_the_validation_groups_too_and_keeps_its_last_epoch(
    unlabelled, mel_cache, repository, tmp_path
):
    with pytest.raises(ValueError, match="use schedule"):
        from_dict({"refit": True})
    out = tmp_path / "refit"
    args = _distill_args(
        unlabelled,
        repository,
        out,
        "separable_student",
        mel_cache,
        refit=True,
        schedule="cosine",
        lr=0.05,
        early_stopping=1,
    )
    assert main([a for a in args if a != "--export"]) == 0
    report = json.loads((out / "distill_report.json").read_text())
    assert report["refit"] and report["groups"]["validation"] == ["album0"] and report["epochs_run"] == 2
    # every patch of the training and the validation album, on the grid and halfway
    cache = FeatureCache(mel_cache, max_duration_s=600.0)
    trained = [t for t in distillation_set(str(unlabelled)) if t.key.split("/")[0] in ("album0", "album2")]
    assert report["patches"]["train"] == sum(len(patch_starts(len(cache.frames(t.source)))) for t in trained)
    # the last epoch is the model, whatever the validation loss did
    assert torch.load(out / "best.pt", map_location="cpu", weights_only=False)["epoch"] == 1
    assert (out / "best.pt").read_bytes() == (out / "last.pt").read_bytes()


def test_distill_music_trains_the_student_only_never_the_calibration_validation_or_held_out(
    unlabelled, mel_cache, repository, tmp_path, monkeypatch
):
    """Debian's ``distill``-role packages join the training packages; the calibration reference,
    the validation and the held-out music stay the reference packages'."""
    music = tmp_path / "music"
    entries = []
    for role, package, album in (
        ("reference", "val", "album0"),
        ("reference", "held", "album1"),
        ("reference", "tunes", "album2"),
        ("distill", "extra", "album0"),
    ):
        shutil.copytree(unlabelled / album, music / role / package / "music")
        (music / role / package / debian_music.READY).write_text("test\n")
        entries.append(f'[[package]]\nname = "{package}"\nrole = "{role}"\ngenre = "test"\nmusic = ["music"]\n')
    (tmp_path / "list.toml").write_text("\n".join(entries))
    monkeypatch.setattr(debian_music, "LIST", tmp_path / "list.toml")
    monkeypatch.setattr(debian_music, "DEFAULT_DEST", music)
    out = tmp_path / "student"
    groups = {"validation_groups": ["val"], "holdout_groups": ["held"]}
    assert (
        main(_distill_args("debian", repository, out, "separable_student", mel_cache, distill_music=True, **groups))
        == 0
    )
    report = json.loads((out / "distill_report.json").read_text())
    assert report["distill_music"] and report["groups"] == {
        "train": ["extra", "tunes"],
        "validation": ["val"],
        "test": ["held"],
    }
    assert report["tracks"] == {"train": 7, "validation": 4, "test": 3}
    cache = FeatureCache(mel_cache, max_duration_s=600.0)
    trained = [
        t
        for role, package in (("reference", "tunes"), ("distill", "extra"))
        for t in (music / role / package / "music").iterdir()
    ]
    assert report["patches"]["train"] == sum(len(patch_starts(len(cache.frames(str(t))))) for t in trained)
    # the student's calibration is over the reference packages' 10 tracks, as the teacher's
    assert load_taxonomy(read_meta(repository, "musicnn_student")).calibration.tracks == 10

    with pytest.raises(ValueError, match="distill-role packages only train"):
        main(
            _distill_args(
                "debian",
                repository,
                out,
                "separable_student",
                mel_cache,
                distill_music=True,
                validation_groups=["extra"],
                holdout_groups=["held"],
            )
        )
    with pytest.raises(ValueError, match="is not 'debian'"):
        main(_distill_args(unlabelled, repository, out, "separable_student", mel_cache, distill_music=True))


def _teachers_filters(student) -> list[bool]:
    """Per filter the student's MTT network keeps in its first timbral branch (signed): whether
    it is still one of the teacher's 204."""
    teacher, _ = load_checkpoint(REPO_ROOT / "training" / "weights" / "musicnn_mtt.pt")
    rows = teacher.frontend[0].conv.weight.flatten(1)
    kept = student.nets[1].frontend[0].mix.weight.flatten(1)
    return [bool(torch.isclose(row.abs(), rows.abs(), atol=1e-6).all(dim=1).any()) for row in kept]


def test_the_lite_student_starts_as_the_teachers_networks_and_keeps_their_filters(
    unlabelled, mel_cache, repository, tmp_path
):
    out = tmp_path / "lite"
    assert main(_distill_args(unlabelled, repository, out, "musicnn_student", mel_cache, epochs=1)) == 0
    trained, _ = load_checkpoint(out / "best.pt")
    assert all(_teachers_filters(trained))


def test_from_unfreeze_epoch_on_the_filters_train_too(unlabelled, mel_cache, repository, tmp_path):
    out = tmp_path / "lite"
    assert (
        main(
            _distill_args(unlabelled, repository, out, "musicnn_student", mel_cache, unfreeze_epoch=1, early_stopping=0)
        )
        == 0
    )
    trained, ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["config"]["unfreeze_epoch"] == 1
    assert not any(_teachers_filters(trained))  # every kept filter moved


def test_teacher_checkpoints_that_are_not_the_served_teacher_are_refused(unlabelled, mel_cache, repository, tmp_path):
    swapped = ["training/weights/musicnn_mtt.pt", "training/weights/musicnn_msd.pt"]
    with pytest.raises(ValueError, match="do not compute the served teacher"):
        main(
            _distill_args(
                unlabelled, repository, tmp_path / "x", "musicnn_student", mel_cache, teacher_checkpoints=swapped
            )
        )
    with pytest.raises(ValueError, match="set teacher_checkpoints"):
        main(
            _distill_args(unlabelled, repository, tmp_path / "y", "musicnn_student", mel_cache, teacher_checkpoints=[])
        )


def test_teacher_outputs_are_the_served_models_on_the_grid_and_halfway_and_cached_once(unlabelled, mel_cache):
    cache = FeatureCache(mel_cache, max_duration_s=600.0)
    teacher = Teacher.from_repository(DEFAULT_MODEL_REPOSITORY, "musicnn")
    sources = [t.source for t in distillation_set(str(unlabelled))][:2]
    outputs, failed = teacher_outputs(sources, cache, teacher, workers=1, progress=False)
    assert not failed
    files = sorted(teacher.folder(cache).glob("*.npz"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    frames = cache.frames(sources[0])
    out = outputs[sources[0]]
    np.testing.assert_array_equal(out["starts"], patch_starts(len(frames)))
    scorer = OnnxScorer(DEFAULT_MODEL_REPOSITORY, "musicnn")
    k = len(out["starts"]) - 1
    direct = scorer.score_sync(np.array(frames[out["starts"][k] : out["starts"][k] + PATCH_FRAMES])[None])
    np.testing.assert_allclose(out["musicnn_mtt_scores"][k], direct["musicnn_mtt"].scores[0], atol=1e-5)
    np.testing.assert_allclose(out["musicnn_msd_embedding"][k], direct["musicnn_msd"].embedding[0], atol=1e-5)
    again, _ = teacher_outputs(sources, cache, teacher, workers=1, progress=False)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    np.testing.assert_array_equal(again[sources[1]]["musicnn_msd_scores"], outputs[sources[1]]["musicnn_msd_scores"])


def test_mixed_patches_are_two_tracks_mixed_with_the_teachers_outputs_on_the_mix_cached_once(unlabelled, mel_cache):
    cache = FeatureCache(mel_cache, max_duration_s=600.0)
    teacher = Teacher.from_repository(DEFAULT_MODEL_REPOSITORY, "musicnn")
    tracks = distillation_set(str(unlabelled))[:3]
    outputs, _ = teacher_outputs([t.source for t in tracks], cache, teacher, workers=1, progress=False)
    patches = TeacherPatches(tracks, cache, outputs, teacher.meta.outputs, grid_only=False)
    mixed = MixedPatches(patches, 8, teacher, seed=0, workers=1, progress=False)
    assert 0 < len(mixed) <= 8 and len(mixed.targets) == len(mixed)
    assert all(patches.items[a][0] != patches.items[b][0] for a, b in mixed.pairs)  # two tracks each
    assert all(MIX_WEIGHTS[0] <= w <= MIX_WEIGHTS[1] for w in mixed.weights)
    scorer = OnnxScorer(DEFAULT_MODEL_REPOSITORY, "musicnn")
    for k in (0, len(mixed) - 1):
        mel, target = mixed[k]
        (a, _), (b, _) = (patches[int(i)] for i in mixed.pairs[k])
        np.testing.assert_allclose(mel.numpy(), mix_frames(a.numpy(), b.numpy(), float(mixed.weights[k])), atol=1e-6)
        direct = scorer.score_sync(mel.numpy()[None])
        served = {
            f"{name}_{part}": getattr(out, part) for name, out in direct.items() for part in ("scores", "embedding")
        }
        np.testing.assert_allclose(target.numpy(), teacher_targets(served, teacher.meta.outputs)[0], atol=1e-3)
        # a target is the teacher on the mix, not the mix of the teacher's targets
        assert (
            np.abs(
                target.numpy()
                - (
                    mixed.weights[k] * patches[int(mixed.pairs[k][0])][1].numpy()
                    + (1 - mixed.weights[k]) * patches[int(mixed.pairs[k][1])][1].numpy()
                )
            ).max()
            > 0.05
        )
    files = sorted(teacher.folder(cache).glob("mixed-*.npz"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = MixedPatches(patches, 8, teacher, seed=0, workers=1, progress=False)
    assert {f: f.stat().st_mtime_ns for f in sorted(teacher.folder(cache).glob("mixed-*.npz"))} == stamps
    np.testing.assert_array_equal(again.targets, mixed.targets)
    assert not np.array_equal(MixedPatches(patches, 8, teacher, seed=1, workers=1, progress=False).pairs, mixed.pairs)


def test_the_mix_stage_goes_on_from_init_over_the_patches_and_the_mixes_filters_frozen(
    unlabelled, mel_cache, repository, tmp_path
):
    first = tmp_path / "first"
    assert main(_distill_args(unlabelled, repository, first, "musicnn_student", mel_cache, epochs=1)) == 0
    second = tmp_path / "second"
    options = {"init": str(first / "best.pt"), "epochs": 0, "mix_epochs": 1, "mixed_patches": 12, "version": ""}
    assert main(_distill_args(unlabelled, repository, second, "musicnn_student", mel_cache, **options)) == 0
    report = json.loads((second / "distill_report.json").read_text())
    assert report["student"]["checkpoint"] == str(second / "mix" / "best.pt") and report["epochs_run"] == 0
    assert 0 < report["patches"]["mixed"] == report["mix_stage"]["mixes"] <= 12 and report["init"] == str(
        first / "best.pt"
    )
    (started, ckpt), (trained, stage) = (load_checkpoint(p) for p in (first / "best.pt", second / "mix" / "best.pt"))
    assert stage["version"] == f"{ckpt['version']}-mix" and stage["epoch"] == 0
    assert all(_teachers_filters(trained))  # frozen_filters freezes them again
    assert any(not torch.equal(p, q) for p, q in zip(started.parameters(), trained.parameters()))
    assert read_meta(repository, "musicnn_student").served_version.startswith(f"{ckpt['version']}-mix")
    narrower = _distill_args(
        unlabelled, repository, tmp_path / "x", "musicnn_student", mel_cache, init=str(first / "best.pt")
    )
    with pytest.raises(ValueError, match="not the configured musicnn_student"):
        main(narrower + ["--set", "dims.channels=[[2, 2, 2, 2, 2], [2, 2, 2, 2, 2]]"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mix_epochs": 2}, "mixed_patches > 0 exactly when mix_epochs > 0"),
        ({"mixed_patches": 100}, "mixed_patches > 0 exactly when mix_epochs > 0"),
        ({"mix_epochs": 1, "mixed_patches": 10, "mix_lr": 0}, "mix_lr > 0"),
        ({"epochs": 0}, "0 with init"),
        ({"init": "a.pt", "resume": "b.pt"}, "set one of them"),
    ],
)
def test_mix_stage_and_init_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        from_dict(options)


def test_patch_starts_are_the_serving_grid_plus_the_points_halfway():
    assert patch_starts(PATCH_FRAMES).tolist() == [0]
    assert patch_starts(3 * PATCH_FRAMES + 10).tolist() == [
        0,
        TEACHER_HOP,
        PATCH_FRAMES,
        PATCH_FRAMES + TEACHER_HOP,
        2 * PATCH_FRAMES,
    ]


def test_split_keeps_groups_whole_and_refuses_unknown_groups():
    tracks = [Track(f"{g}/{i}.ogg", f"/m/{g}/{i}.ogg") for g in ("p1", "p2", "p3", "p4") for i in range(3)]
    cfg = from_dict({"validation_groups": ["p2"], "holdout_groups": ["p3", "p4"]})
    splits = split_by_group(tracks, cfg)
    assert {t.key.split("/")[0] for t in splits["train"]} == {"p1"} and len(splits["test"]) == 6
    with pytest.raises(ValueError, match="not in the music"):
        split_by_group(tracks, from_dict({"holdout_groups": ["nope"]}))
    hashed = split_by_group(tracks, from_dict({"val_fraction": 0.25, "test_fraction": 0.25}))
    groups = [{t.key.split("/")[0] for t in v} for v in hashed.values()]
    assert [len(g) for g in groups] == [2, 1, 1] and set.union(*groups) == {"p1", "p2", "p3", "p4"}


def test_a_folder_with_reserved_packages_is_refused(tmp_path):
    (tmp_path / "singularity-music").mkdir()
    (tmp_path / "singularity-music" / "a.ogg").write_bytes(b"x")
    with pytest.raises(ValueError, match="reserved"):
        distillation_set(str(tmp_path))


def test_the_loss_weighs_every_tag_by_the_teachers_spread():
    rng = np.random.default_rng(0)
    targets = np.concatenate([rng.normal(0, [1, 10], (500, 2)), rng.normal(0, 1, (500, 4))], axis=1).astype(np.float32)
    loss = DistillLoss(targets, n_labels=2, embedding_weight=0.5)
    zero = torch.zeros(1, 6)
    # the same error in spread units costs the same on a narrow and on a wide tag
    narrow, wide = zero.clone(), zero.clone()
    narrow[0, 0], wide[0, 1] = 1.0, 10.0
    assert abs(loss(narrow, zero).item() - loss(wide, zero).item()) < 0.05
    assert loss(zero, zero).item() == 0.0
    np.testing.assert_allclose(teacher_logits(np.array([0.5, 0.0])), [0.0, np.log(1e-6) - np.log1p(-1e-6)], rtol=1e-6)


def test_mood_tags_can_weigh_more_without_changing_the_embeddings_share():
    rng = np.random.default_rng(0)
    targets = np.repeat(rng.normal(0, 1, (500, 1)), 6, axis=1).astype(np.float32)  # one spread
    plain = DistillLoss(targets, n_labels=2, embedding_weight=0.5)
    moody = DistillLoss(targets, n_labels=2, embedding_weight=0.5, label_weight=np.array([3.0, 1.0], np.float32))
    zero = torch.zeros(1, 6)
    first, second, embedding = zero.clone(), zero.clone(), zero.clone()
    first[0, 0], second[0, 1], embedding[0, 2:] = 1.0, 1.0, 1.0
    assert moody(first, zero).item() == pytest.approx(3 * moody(second, zero).item())
    assert plain(first, zero).item() == pytest.approx(plain(second, zero).item())
    # the embedding term keeps its weight against the tags as a whole
    assert moody.weight[2:].sum().item() == pytest.approx(0.5) and plain.weight[2:].sum().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="label_weight"):
        DistillLoss(targets, n_labels=2, embedding_weight=0.5, label_weight=np.array([1.0, 0.0], np.float32))


def test_mood_tag_weights_mark_the_tags_moods_are_read_from():
    meta = read_meta(DEFAULT_MODEL_REPOSITORY, "musicnn")
    weights = mood_tag_weights(meta, 3.0)
    labels = [f"{n.name}:{label}" for n in meta.networks for label in n.labels]
    members = {m.key for f in load_taxonomy(meta, calibrated=False).families for m in f.members}
    assert weights.shape == (len(labels),)
    assert {label for label, w in zip(labels, weights) if w == 3.0} == members
    assert {"musicnn_msd:happy", "musicnn_mtt:metal"} <= members and "musicnn_msd:rock" not in members
    assert set(weights.tolist()) == {1.0, 3.0}
    with pytest.raises(ValueError, match="mood_tag_weight"):
        from_dict({"mood_tag_weight": 0})


def test_the_student_gives_every_imitated_networks_tags_and_embedding():
    model = build("separable_student", {})
    logits, embedding = model(torch.zeros(2, PATCH_FRAMES, N_MELS))
    assert logits.shape == (2, 100) and embedding.shape == (2, 400)
    with pytest.raises(ValueError, match="label_counts"):
        build("separable_student", {"n_classes": 4})


def test_compare_is_perfect_for_the_teacher_itself_and_chance_for_noise():
    rng = np.random.default_rng(0)
    teacher = rng.random((400, 50)).astype(np.float32)
    track_of = np.repeat(np.arange(40), 10)
    same = compare(teacher, teacher, track_of)
    # top-5 membership also depends on the other tags of the patch, so even the teacher is not
    # a perfect per-tag ranker of it
    assert same["roc_auc_median"] == 1.0 and same["top5_overlap"] == 1.0 and same["roc_auc_top5"] > 0.95
    assert same["spearman_track"] == pytest.approx(1.0) and same["top5_overlap_track"] == 5.0
    assert abs(same["pearson_r"] - 1.0) < 1e-6
    noise = compare(rng.random((400, 50)).astype(np.float32), teacher, track_of)
    assert 0.4 < noise["roc_auc_median"] < 0.6 and abs(noise["pearson_r"]) < 0.1 and noise["top5_overlap"] < 0.3
    assert abs(noise["spearman_track"]) < 0.3 and noise["top5_overlap_track"] < 2


def test_mood_agreement_reads_the_leading_mood_against_the_teachers_lead_and_its_own_shift():
    meta = read_meta(DEFAULT_MODEL_REPOSITORY, "musicnn")
    taxonomy, teacher = load_taxonomy(meta), SimpleNamespace(meta=meta)
    rng = np.random.default_rng(0)

    def by_network(row):
        return {n.name: row[k * 50 : (k + 1) * 50].astype(np.float32) for k, n in enumerate(meta.networks)}

    def view(row):
        return mood_view(taxonomy, by_network(row))

    def lead(row):
        scores = sorted(view(row).moods.values(), reverse=True)
        return scores[0] - scores[1]

    def track_scores():
        """[100] both networks' tag scores, each mood tag at a random level of the reference's."""
        row = rng.random(100) * 0.01
        for k, network in enumerate(meta.networks):
            for j, label in enumerate(network.labels):
                quantiles = taxonomy.calibration.tags.get(f"{network.name}:{label}")
                if quantiles is not None:
                    row[k * 50 + j] = np.interp(rng.random(), np.linspace(0, 1, len(quantiles)), quantiles)
        return row

    pool = [track_scores() for _ in range(60)]
    clear = next(r for r in pool if lead(r) >= 2 * NEAR_TIE)
    tie = next(r for r in pool if lead(r) < NEAR_TIE)

    def another_mood(row):
        return next(r for r in pool if view(r).leading_mood["mood"] != view(row).leading_mood["mood"])

    grids = [clear] * 5 + [tie]
    # Tracks 0-2: the shifted patches score as the grid's; track 3: as a track with another
    # leading mood; tracks 4-5: no shifted patches at all.
    shifted = [clear, clear, clear, another_mood(clear), None, None]
    outputs = {}
    for i, (grid, shift) in enumerate(zip(grids, shifted)):
        starts = [0, PATCH_FRAMES] + ([TEACHER_HOP] if shift is not None else [])
        rows = np.stack([grid, grid] + ([shift] if shift is not None else [])).astype(np.float32)
        outputs[f"s{i}"] = {
            "starts": np.array(starts),
            **{n.scores_output: rows[:, k * 50 : (k + 1) * 50] for k, n in enumerate(meta.networks)},
        }
    tracks = [Track(f"t{i}", f"s{i}") for i in range(6)]
    # The student agrees on tracks 0-3, and gives another leading mood on 4 (the teacher leads
    # clearly) and 5 (a near-tie).
    student = {f"s{i}": by_network(row) for i, row in enumerate(grids[:4] + [another_mood(clear), another_mood(tie)])}

    result = mood_agreement(tracks, student, outputs, teacher, taxonomy, taxonomy)
    assert result["tracks"] == 6 and result["leading_mood_same"] == pytest.approx(4 / 6)
    assert result["teacher_shifted_same"] == pytest.approx(3 / 4)  # only tracks with shifted patches count
    assert [(r["track"], r["teacher_lead"]) for r in result["disagreements"]] == [
        ("t4", pytest.approx(lead(clear), abs=1e-4)),
        ("t5", pytest.approx(lead(tie), abs=1e-4)),
    ]
    assert result["leading_mood_same_teacher_leads"] == {
        "tracks": 5,
        "same": pytest.approx(4 / 5),
        "lead_at_least": NEAR_TIE,
    }
