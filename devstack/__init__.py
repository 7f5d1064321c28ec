"""The dev-only embedded stack: a real Kafka-protocol broker (Tansu), a real S3 server (moto) and
a real Triton server (CPU), started as local processes for the demo, the tests and the
benchmarks; PostgreSQL for the catalog's tests; the demo itself. Production never imports it and
no image ships it: there the same worker is pointed at Kafka, S3 and GPU Triton by its settings.

    python -m devstack            start the services, print their environment, hold until Ctrl-C
"""

from devstack.postgres import EmbeddedPostgres
from devstack.stack import EmbeddedStack
from devstack.supervisor import StackError, free_ports

__all__ = ["EmbeddedPostgres", "EmbeddedStack", "StackError", "free_ports"]
