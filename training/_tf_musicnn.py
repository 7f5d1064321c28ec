"""TensorFlow side of ``moodstream-train import-musicnn``; runs in a separate environment.

Usage: python _tf_musicnn.py IN.npz OUT.npz
  IN.npz:  patches [n, 187, 96] float32 (real music, from moodstream's frontend)
  OUT.npz: for each model M in (MSD_musicnn, MTT_musicnn):
           M/<tf variable name> (weights), M/labels, M/probs [n, 50] and M/embedding [n, 200]
           of the original graph on those patches.

Usage: python _tf_musicnn.py --tag OUT.npz FILE...
  The original end to end: librosa.load at 16 kHz, librosa mel, log compression, musicnn's
  patching, the TensorFlow graph; track score = mean over patches. OUT.npz holds, per model M,
  M/f16 and M/f32 [n_files, 50]: with the extractor's float16 compression as published, and
  in float32; plus ``overflow`` [n_files], the fraction of mel bins whose float16 compression
  is inf. Needs librosa in this environment too.

Needs tensorflow-cpu, tf-keras (musicnn uses ``tf.compat.v1.layers``, gone from Keras 3) and
the musicnn package (``pip install musicnn==0.1.0 --no-deps``): the graph is rebuilt with musicnn's own ``models.define_model`` and restored with
``tf.compat.v1.train.Saver`` exactly as musicnn's extractor does, which avoids
``import_meta_graph`` (it fails on the optimizer's stored gradient nodes).
"""

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow is imported

import numpy as np
import tensorflow as tf

from musicnn import configuration, models

MODELS = {"MSD_musicnn": configuration.MSD_LABELS, "MTT_musicnn": configuration.MTT_LABELS}


def run(model: str, labels: list, patches: np.ndarray) -> dict:
    ckpt = os.path.join(os.path.dirname(models.__file__), model) + "/"
    reader = tf.compat.v1.train.NewCheckpointReader(ckpt)
    out = {
        f"{model}/{name}": reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if "Adam" not in name and not name.startswith("beta")
    }
    tf.compat.v1.reset_default_graph()
    with tf.name_scope("model"):
        x = tf.compat.v1.placeholder(tf.float32, [None, patches.shape[1], configuration.N_MELS])
        is_training = tf.compat.v1.placeholder(tf.bool)
        logits, *_, penultimate = models.define_model(x, is_training, model, len(labels))
        probs = tf.nn.sigmoid(logits)
    with tf.compat.v1.Session() as sess:
        tf.compat.v1.train.Saver().restore(sess, ckpt)
        p, e = sess.run([probs, penultimate], {x: patches, is_training: False})
    out[f"{model}/labels"] = np.array(labels)
    out[f"{model}/probs"] = p
    out[f"{model}/embedding"] = e
    return out


def tag(out: str, files: list) -> None:
    import librosa

    n = 187
    mels = []
    for f in files:
        audio, sr = librosa.load(f, sr=configuration.SR)
        mels.append(librosa.feature.melspectrogram(y=audio, sr=sr, hop_length=configuration.FFT_HOP, n_fft=configuration.FFT_SIZE, n_mels=configuration.N_MELS).T)
    variants = {}
    with np.errstate(over="ignore"):
        variants["f16"] = [np.log10(10000 * m.astype(np.float16) + 1) for m in mels]
    variants["f32"] = [np.log10(10000 * m.astype(np.float32) + 1) for m in mels]
    result = {"overflow": np.array([float(np.isinf(v).mean()) for v in variants["f16"]])}
    for model, labels in MODELS.items():
        tf.compat.v1.reset_default_graph()
        with tf.name_scope("model"):
            x = tf.compat.v1.placeholder(tf.float32, [None, n, configuration.N_MELS])
            is_training = tf.compat.v1.placeholder(tf.bool)
            probs = tf.nn.sigmoid(models.define_model(x, is_training, model, len(labels))[0])
        ckpt = os.path.join(os.path.dirname(models.__file__), model) + "/"
        with tf.compat.v1.Session() as sess:
            tf.compat.v1.train.Saver().restore(sess, ckpt)
            for name, reps in variants.items():
                rows = []
                for rep in reps:
                    batch = np.stack([rep[t : t + n] for t in range(0, rep.shape[0] - n + 1, n)])
                    rows.append(sess.run(probs, {x: batch, is_training: False}).mean(axis=0))
                result[f"{model}/{name}"] = np.stack(rows)
    np.savez(out, **result)


def main() -> None:
    tf.compat.v1.disable_eager_execution()
    if sys.argv[1] == "--tag":
        tag(sys.argv[2], sys.argv[3:])
        return
    patches = np.load(sys.argv[1])["patches"]
    result = {}
    for model, labels in MODELS.items():
        result.update(run(model, labels, patches))
    np.savez(sys.argv[2], **result)


if __name__ == "__main__":
    main()
