"""Training and export: from audio and labels (or a teacher's outputs) to a model repository entry.

    data/         data sets (the labelled sets, Debian's music list, the mel cache)
    models/       architectures and the checkpoint format
    engine        the training loop that ``fit`` and distillation run
    fit, evaluate one run on a labelled set, and its evaluation
    serving       the served graph (networks + output activations); export writes it to triton_models/
    calibrate     the moods' calibration over reference music
    distill/      the CPU student learned from the teacher's outputs

Training runs from a clone (``python -m training`` / ``moodstream-train``); relative paths in its
configurations are read against the clone's root.
"""

from pathlib import Path

#: The clone's root: relative paths in training configurations (teacher checkpoints) start here.
REPO_ROOT = Path(__file__).resolve().parent.parent
