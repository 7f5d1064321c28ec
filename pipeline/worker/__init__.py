"""The streaming worker: ``tracks.ingested`` -> every stage -> ``tracks.moods``.

    faust_app    the Faust app: thin wiring, offsets, metrics endpoint (``moodstream worker``)
    batch        :class:`~pipeline.worker.batch.BatchWorker`: one batch through every stage, errors as dead letters
    pool         the decoding process pool (shared with the HTTP service)
    handoff      a track's file and patches between the event loop and its decoding process, by shared memory

Importing this package imports no Faust: the service and the benchmarks use the pool and the batch
worker without it.
"""
