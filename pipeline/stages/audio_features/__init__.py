"""The audio-features stage: tempo, beats, meter, key, loudness and Spotify-style descriptors.

    stream = AudioFeatureStream(rate, channels)     # the decoder's rate, every channel
    for chunk in chunks:                            # float32 [channels, n], any n
        stream.push(chunk)
    features = stream.finish()                      # AudioFeatures
    features = features.with_tags(tag_scores)       # + acousticness, instrumentalness, liveness
    record = features.to_dict()

:func:`analyse` does the same for a whole signal in memory. Modules: ``loudness`` (BS.1770-4,
EBU Tech 3342, true peak), ``spectral`` (the low-rate frames), ``rhythm`` (tempo, beats,
meter), ``tonal`` (key), ``descriptors`` (energy, danceability, speechiness, fades, the
model-derived fields), ``result`` (the dataclasses), ``stream`` (the accumulator). Nothing
here imports the rest of the product: inputs are numpy arrays, misuse raises ValueError or
RuntimeError, bad audio gives defined fields. docs/audio-features.md describes every field.
"""

from __future__ import annotations

import numpy as np

from pipeline.stages.audio_features.descriptors import from_tags
from pipeline.stages.audio_features.result import DSP_FIELDS, MODEL_FIELDS, AudioFeatures, Section
from pipeline.stages.audio_features.stream import DEFAULT_SEGMENT_S, AudioFeatureStream

__all__ = [
    "DEFAULT_SEGMENT_S",
    "DSP_FIELDS",
    "MODEL_FIELDS",
    "AudioFeatureStream",
    "AudioFeatures",
    "Section",
    "analyse",
    "from_tags",
]


def analyse(
    samples: np.ndarray, rate: int, *, segment_s: float = DEFAULT_SEGMENT_S, chunk: int = 65_536
) -> AudioFeatures:
    """The features of a whole signal: float32 [channels, n] (or [n]) at ``rate``."""
    x = np.asarray(samples, np.float32)
    if x.ndim == 1:
        x = x[None, :]
    stream = AudioFeatureStream(rate, x.shape[0], segment_s=segment_s)
    for i in range(0, x.shape[1], chunk):
        stream.push(x[:, i : i + chunk])
    return stream.finish()
