"""moodstream: mood tags and audio features for every track of a music catalog.

The package is the product that ships: the ``moodstream`` command (:mod:`pipeline.cli`), and in it

    contracts/   what crosses the wire: the records on Kafka and HTTP, their schemas, a model's metadata
    stages/      plain functions, one concern each: fetch, decode, frontend, scoring, moods, one track's analysis
    worker/      the streaming worker: Faust wiring, the batch worker, the decoding pool, the hand-off
    service/     ``moodstream serve``: the HTTP API, the catalog store, the web page

beside the settings (declared once), the one exception tree and the metrics. The dev-only embedded
stack lives apart (``devstack/``) and never ships.
"""
