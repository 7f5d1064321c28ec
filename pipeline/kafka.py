"""Kafka client options from the settings, for the aiokafka clients beside the Faust worker (the
backfill's producer, the service's catalog consumer). Faust's own credentials are built from the
same settings in :mod:`pipeline.worker.faust_app`."""

from __future__ import annotations

import ssl
from typing import Any

from pipeline.settings import Settings


def kafka_options(s: Settings) -> dict[str, Any]:
    """aiokafka client options for the configured cluster (security from the environment)."""
    options: dict[str, Any] = {
        "bootstrap_servers": s.kafka_bootstrap,
        "security_protocol": s.kafka_security_protocol.value,
    }
    if s.kafka_security_protocol.uses_ssl:
        options["ssl_context"] = ssl.create_default_context()
    if s.kafka_security_protocol.uses_sasl:
        options.update(
            sasl_mechanism=s.kafka_sasl_mechanism,
            sasl_plain_username=s.kafka_sasl_username,
            sasl_plain_password=s.kafka_sasl_password.get_secret_value(),
        )
    return options
