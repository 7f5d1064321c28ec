"""``moodstream serve``: the HTTP API and the web page over uploads and the tagged catalog.

app          the FastAPI app: lifespan (scorer, decoding pool, catalog and its consumer), metrics
routes       the routes, thin
problems     application/problem+json answers, third-party errors translated once
uploads      an upload streamed to disk under a cap, then through the worker's stages
catalog      :class:`~pipeline.service.catalog.CatalogStore` (SQLite / PostgreSQL) and its consumer of tracks.moods
neighbours   the similar-tracks index
web/         the page's assets
"""
