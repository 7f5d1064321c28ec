"""The metric helpers: consumer lag per partition, Triton error and retry counters, the split
of decoding and feature time measured inside ``analyse``."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from pipeline import metrics
from pipeline.errors import InferenceFailed, ServiceUnavailable
from pipeline.stages import scoring
from pipeline.stages.analysis import analyse


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_lag_is_end_offset_minus_committed_or_earliest():
    lags = metrics.partition_lag({0: 120, 1: 50, 2: 7}, {0: 100, 1: None, 2: 7}, {1: 20})
    assert lags == {0: 20, 1: 30, 2: 0}


def test_lag_never_negative():
    # A committed offset can run ahead of a cached end offset for a moment.
    assert metrics.partition_lag({0: 5}, {0: 9}, {}) == {0: 0}


def test_revoked_partitions_lose_their_lag_series():
    metrics.set_consumer_lag({0: 3, 1: 4})
    assert sample("moodstream_consumer_lag_messages", partition="1") == 4
    metrics.set_consumer_lag({0: 1})
    assert sample("moodstream_consumer_lag_messages", partition="0") == 1
    assert sample("moodstream_consumer_lag_messages", partition="1") is None
    metrics.set_consumer_lag({})
    assert sample("moodstream_consumer_lag_messages", partition="0") is None


def _flaky(failures: list[str]):
    """A call failing with each gRPC status of ``failures`` in turn, then returning 42."""
    remaining = list(failures)

    async def call():
        if remaining:
            raise InferenceServerException("boom", status=remaining.pop(0))
        return 42

    return call


def test_triton_retries_and_errors_are_counted_per_model_and_code():
    before_errors = sample("moodstream_triton_request_errors_total", model="m-retry", code="UNAVAILABLE") or 0
    result = asyncio.run(
        scoring._retry(_flaky(["StatusCode.UNAVAILABLE"] * 2), 3, "test", "m-retry", base_delay_s=0.001)
    )
    assert result == 42
    assert sample("moodstream_triton_request_errors_total", model="m-retry", code="UNAVAILABLE") - before_errors == 2
    assert sample("moodstream_triton_request_retries_total", model="m-retry") == 2


def test_exhausted_retries_and_rejections_are_counted_too():
    with pytest.raises(ServiceUnavailable):
        asyncio.run(
            scoring._retry(_flaky(["StatusCode.DEADLINE_EXCEEDED"] * 5), 2, "test", "m-out", base_delay_s=0.001)
        )
    assert sample("moodstream_triton_request_errors_total", model="m-out", code="DEADLINE_EXCEEDED") == 2
    assert sample("moodstream_triton_request_retries_total", model="m-out") == 1
    with pytest.raises(InferenceFailed):
        asyncio.run(scoring._retry(_flaky(["StatusCode.INVALID_ARGUMENT"]), 4, "test", "m-bad", base_delay_s=0.001))
    assert sample("moodstream_triton_request_errors_total", model="m-bad", code="INVALID_ARGUMENT") == 1
    assert sample("moodstream_triton_request_retries_total", model="m-bad") is None


def test_analyse_times_decoding_and_features_separately(example_clips):
    data = example_clips[0].read_bytes()
    start = time.perf_counter()
    result = analyse(data, max_duration_s=60, min_duration_s=1)
    wall = time.perf_counter() - start
    assert result.decode_s > 0 and result.features_s > 0
    assert result.decode_s + result.features_s <= wall
    # Both stages do real work on a 30 s clip: neither can be a rounding error of the other.
    assert min(result.decode_s, result.features_s) > 0.01 * wall
