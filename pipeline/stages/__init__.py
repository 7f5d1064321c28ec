"""The stages: plain functions a test can call, one concern each.

    storage      URI allow-list, S3 fetch with size cap and retries, listing
    audio        streaming decode (PyAV, libsndfile fallback), downmix, soxr resampling
    audio_features  tempo, beats, key, loudness and Spotify-style descriptors, streamed from the decoder
    frontend     the audio frontend: log-mel patches, defined once for training and serving
    scoring      Triton (gRPC) and in-process onnxruntime scorers
    taxonomy     tag scores -> mood families, valence/arousal, quadrant, timeline
    analysis     one track through the CPU stages, and its record's fields

None of them knows Faust, FastAPI or Kafka.
"""
