"""TensorFlow side of ``moodstream-train import-musicnn``; runs in a separate environment.

Usage: python _tf_musicnn.py IN.npz OUT.npz
  IN.npz:  patches [n, 187, 96] float32 (real music, from moodstream's frontend)
  OUT.npz: for each model M in (MSD_musicnn, MTT_musicnn):
           M/<tf variable name> (weights), M/labels, M/probs [n, 50] and M/embedding [n, 200]
           of the original graph on those patches.

Usage: python _tf_musicnn.py --tag MODEL OUT.npz FILE...
  The original end to end (musicnn's own extractor: librosa.load, librosa mel, float16 log
  compression, TensorFlow): OUT.npz holds the track score [50] (mean over patches) per file,
  in argument order, as ``scores`` [n_files, 50]. Needs librosa in this environment too.

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


def tag(model: str, out: str, files: list) -> None:
    from musicnn.extractor import extractor

    scores = [extractor(f, model=model, extract_features=False)[0].mean(axis=0) for f in files]
    np.savez(out, scores=np.stack(scores))


def main() -> None:
    tf.compat.v1.disable_eager_execution()
    if sys.argv[1] == "--tag":
        tag(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    patches = np.load(sys.argv[1])["patches"]
    result = {}
    for model, labels in MODELS.items():
        result.update(run(model, labels, patches))
    np.savez(sys.argv[2], **result)


if __name__ == "__main__":
    main()
