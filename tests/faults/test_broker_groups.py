"""A restarted static member of a consumer group gets its partitions back (found by the chaos run).

Tansu 0.6 re-forms a group without a new generation when a static member (``group.instance.id``,
``MOODSTREAM_KAFKA_GROUP_INSTANCE_ID``) rejoins with other metadata, as every restarted Faust
worker does: its metadata carries its current assignment. It then told the leader's heartbeats
"no error" and the rejoining member's SyncGroup "rebalance in progress" for ever, so the
restarted worker never got its partitions back and their tracks were never tagged (chaos run,
seed 3: 110 of 600 tracks stuck). The embedded stack's Kafka front now tells the group's
members to rejoin meanwhile, as Apache Kafka does (:class:`devstack.kafka_front.GroupRepair`).

Real clients against the real broker: two static members of one group, the second stopped
(a static member sends no LeaveGroup) and restarted with new metadata while the first leads.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

pytestmark = pytest.mark.faults
PARTITIONS = 4


def _assignor(user_data: bytes) -> type[RoundRobinPartitionAssignor]:
    class WithUserData(RoundRobinPartitionAssignor):
        name = "roundrobin"

        @classmethod
        def metadata(cls, topics):
            return ConsumerProtocolMemberMetadata(cls.version, list(topics), user_data)

    return WithUserData


def _consumer(stack, topic: str, instance: str, user_data: bytes) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=stack.kafka_bootstrap,
        group_id=f"{topic}-group",
        group_instance_id=instance,
        enable_auto_commit=False,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
        rebalance_timeout_ms=10_000,
        partition_assignment_strategy=(_assignor(user_data),),
    )


async def _assigned_within(consumers: list[AIOKafkaConsumer], timeout_s: float) -> set[int]:
    """Poll every consumer until together they hold every partition (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    held: set[int] = set()
    while time.monotonic() < deadline:
        await asyncio.gather(*(c.getmany(timeout_ms=500) for c in consumers))
        held = {tp.partition for c in consumers for tp in c.assignment()}
        if held == set(range(PARTITIONS)):
            break
    return held


async def test_a_static_member_rejoining_with_new_metadata_gets_its_partitions_back(stack):
    topic = "groups-static"
    stack.create_topics([topic], partitions=PARTITIONS)
    a = _consumer(stack, topic, "member-a", b"a")
    b = _consumer(stack, topic, "member-b", b"assignment before")
    await a.start()
    await b.start()
    b_again = None
    try:
        assert await _assigned_within([a, b], 120) == set(range(PARTITIONS))
        # A static member sends no LeaveGroup when it stops: its session outlives it, as a crash's.
        await b.stop()
        b_again = _consumer(stack, topic, "member-b", b"assignment after restart")
        # start() returns once the member has its assignment; before the repair it never did.
        await asyncio.wait_for(asyncio.gather(b_again.start(), _assigned_within([a], 60)), 180)
        held = await _assigned_within([a, b_again], 120)
        assert held == set(range(PARTITIONS)), f"partitions held after the restart: {sorted(held)}"
        assert b_again.assignment(), "the restarted member got nothing"
    finally:
        for c in (a, b_again):
            if c is not None:
                await c.stop()
