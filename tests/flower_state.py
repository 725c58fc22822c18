"""Flower's in-memory simulation state, set up as its simulation process sets it up.

For tests and benchmarks that drive Flower's engine loop and the ServerApp's
Grid without starting a simulation: the state, its run, its nodes and the
Grid are Flower's own.
"""

from __future__ import annotations

from uuid import uuid4

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager

RUN_ID, TASK_ID = 7, 11

#: The process-wide identity (attribute -> value) that Flower's simulation process
#: sets on ``TaskIdentity`` for its ServerApp; messages built here take it.
SERVERAPP_IDENTITY = {"_task_id": TASK_ID, "_run_id": RUN_ID, "_node_id": SUPERLINK_NODE_ID}


def simulation_state(nodes: int) -> tuple[LinkStateFactory, Run, dict[int, int]]:
    """Flower's in-memory state with one run and ``nodes`` nodes, and the node -> partition map."""
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    assert isinstance(state, InMemoryLinkState)
    run = Run.create_empty(run_id=RUN_ID)
    run.primary_task_id = TASK_ID
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=run.run_id)
    return factory, run, vce_api._register_nodes(nodes, factory)


def set_serverapp_identity() -> None:
    """Set :data:`SERVERAPP_IDENTITY` on ``TaskIdentity`` for this process."""
    for name, value in SERVERAPP_IDENTITY.items():
        setattr(TaskIdentity, name, value)


def node_reply(message: Message) -> Message:
    """A reply to ``message`` naming its node (``config.node``), as Flower's workers make one."""
    node = message.metadata.dst_node_id
    reply = Message(RecordDict({"config": ConfigRecord({"node": node})}), reply_to=message)
    reply.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's workers do
    return reply
