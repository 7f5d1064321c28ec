"""Distillation (``moodstream-train distill``): a small student learns a served teacher's outputs on unlabelled music.

    unlabelled music: Debian's reference packages (``debian``, the default: the list in
    training/data/debian_music.toml, fetched by ``make music``), a folder or an s3:// prefix;
    with ``distill_music`` Debian's distill-role packages too, as training groups only (they
    are not the calibration reference)
    -> groups: the package (Debian) or the album (a folder's first-level subfolder); validation
       and held-out groups (``validation_groups``, ``holdout_groups``, else a hash split of the
       groups) are never trained on, so the held-out music is unlike the training music; with
       ``refit`` the validation groups are trained on too, for a fixed number of epochs
    -> mel cache and the teacher's outputs (every network's scores and embedding) on patches every
       ``TEACHER_HOP`` frames, computed once (:mod:`training.distill.teacher`)
    -> the student (``arch``; ``student`` by default: every network's tags and embeddings from one
       trunk) trains in the loop ``fit`` uses on every training patch each epoch, with the loss
           MSE of the logits against the teacher's logits, each tag scaled by the teacher's spread
           (the tags moods.toml reads moods from weighted ``mood_tag_weight``, the others 1)
           + ``embedding_weight`` x MSE of the embeddings, each dimension likewise scaled
       (logit matching: a tag the teacher scores 0.001 to 0.02 is ranked as carefully as one it
       scores 0.1 to 0.9; a BCE on probabilities barely sees the former)
       With ``init`` the student starts from that checkpoint's weights (a fresh optimizer and
       schedule) instead of being made from the teacher; with ``epochs = 0`` as well, the stages
       below start from it directly.
    -> with ``mood_epochs``, the mood stage (:mod:`training.distill.mood_stage`): epochs over whole
       training tracks that add the families' order to the loss; its model (``mood.pt``) goes on
       to the mix stage, or is the one reported and exported
    -> with ``mix_epochs``, the mix stage (:func:`mix_stage`): the main loop again, from the model
       so far with its filters frozen (``frozen_filters``), over the training patches and
       ``mixed_patches`` mixes of two training tracks' patches (power weights drawn from
       ``MIX_WEIGHTS``), each mix's target the teacher's outputs on the mix itself (computed once,
       :func:`~training.distill.teacher.mixed_outputs`): inputs unlike any one track, and what the
       teacher says of exactly them; its model (``mix/best.pt``) is the one reported and exported
    -> agreement with the teacher on the held-out groups' serving patches -> distill_report.json

With ``--export`` the best checkpoint goes on into the model repository (named ``name``), its
mood calibration is computed over the same reference music as the teacher's (the student's own
track scores, from the cached frames) and the report adds the mood agreement, on the held-out
groups and on the reserved check packages when they are fetched (scored, never trained or
tuned on).

``moodstream-train agreement`` computes the same held-out and check figures for a student already
in the model repository (its served ONNX graph and calibration), without training or exporting.

Agreement figures (student against teacher; the goals are the CPU-tier issue's):

    roc_auc_median        per tag, a patch is positive when the teacher scores it above that
                          tag's median over the held-out patches; macro over tags   (>= 0.95)
    roc_auc_median_track  the same on track scores (mean over a track's patches)
    spearman_track        per tag, rank correlation of student and teacher track scores;
                          median over tags                                          (>= 0.9)
    top5_overlap_track    tags of the teacher's top 5 (track scores) in the student's top 5,
                          mean over tracks, of 5                                     (>= 4)
    top5_overlap          the same per patch, as a share
    pearson_r             per tag, correlation of patch scores; mean over tags
    leading_mood_same     share of tracks whose leading mood is the teacher's (>= 0.9; export)
    leading_mood_same_teacher_leads
                          the same on the tracks where the teacher's first mood leads its
                          second by at least ``NEAR_TIE`` (the rest are near-ties)
    teacher_shifted_same  the teacher against itself: its leading mood on the patches half a
                          patch off the serving grid, against the grid's
"""

from training.distill.agreement import agreement
from training.distill.run import distill

__all__ = ["agreement", "distill"]
