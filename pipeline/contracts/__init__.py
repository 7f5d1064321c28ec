"""What crosses the wire: the records on the Kafka topics and over HTTP (:mod:`.events`), the JSON
Schemas shipped for consumers (``schemas/``), and a served model's metadata as Triton's
``config.pbtxt`` carries it (:mod:`.model_meta`). No client library is imported here."""
