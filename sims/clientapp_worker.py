"""A long-lived ClientApp process for a SuperNode started with ``--isolation process``.

In Flower 1.42 a SuperNode turns every message it receives into a *task*.
With ``--isolation subprocess`` (the default) the SuperNode's own SuperExec
starts a fresh ``flwr-clientapp`` process for each task, which imports the
app (PyTorch included) and loads the node's data again: several seconds per
message. With ``--isolation process`` the SuperNode starts nothing; whoever
runs it acquires the tasks from its Runtime API (``AcquireTask``, the call
Flower's SuperExec makes) and serves them.

``python -m sims.clientapp_worker --runtime-api-address 127.0.0.1:9094``
is such a server, and it stays up: it acquires ClientApp tasks one at a time
and runs each in this one process with Flower's own task functions
(``pull_task_input``, ``install_from_fab``, the ClientApp loader,
``push_message``, ``push_task_output``: what ``flwr-clientapp`` does for its
single task). Modules are imported once, so the module-level caches of
:mod:`strategies.client_app` (run configuration, the node's data, the model
object) live across the messages of a run and across runs.

One process serves one app version (FAB hash) at a time: a task of another
FAB makes the process replace itself (``exec``, same PID) with a fresh
interpreter that serves that task first, so that a changed app is never run
with the old modules.

It does not import ``strategies`` or ``torch`` itself (the app does, from the
FAB's copy); ``fedmerge supernode`` starts it beside the SuperNode and stops
both by PID.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

logger = logging.getLogger("fedmerge.clientapp_worker")

#: Seconds between two ``AcquireTask`` calls right after a task; the wait doubles after
#: each poll that finds none, up to :data:`IDLE_POLL_INTERVAL`.
POLL_INTERVAL = 0.02
#: The longest wait between two polls. Every poll costs the SuperNode a request
#: (several ms of CPU): at 50 a second an idle node kept a tenth of a core busy.
#: The SuperNode itself asks the SuperLink for messages every 3 s while it has
#: none, and looks for replies to send every 0.5 s.
IDLE_POLL_INTERVAL = 0.25
#: First and longest wait (s) for a message's objects that the SuperNode is still receiving.
OBJECT_BACKOFF: tuple[float, float] = (0.01, 0.5)


@dataclass
class Loaded:
    """What this process has loaded: at most one app version (FAB hash)."""

    fab_hash: str | None = None
    app: ClientApp | None = None
    served: int = 0


def _client(
    address: str, insecure: bool, certificates: bytes | None, token: str | None
) -> RuntimeHttpClient:
    interceptors: list[ProtobufClientInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")
    ]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def _pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """Flower's ``pull_task_input``, waiting 10 ms, not 1 s, for objects not there yet.

    The SuperNode makes the task before it has received the message's objects
    from the SuperLink; a task acquired at once finds some missing, and
    Flower's default first back-off (1 s) would add a second to every message.
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=OBJECT_BACKOFF[0],
        backoff_cap=OBJECT_BACKOFF[1],
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower sets it
    return message, context, run, fab


def serve_task(
    address: str, token: str, insecure: bool, certificates: bytes | None, loaded: Loaded
) -> None:
    """Run one ClientApp task in this process (``flwr-clientapp``'s steps, no exit)."""
    t0 = time.perf_counter()
    t_pulled = t_loaded = t_ran = t0
    client = _client(address, insecure, certificates, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message: Message | None = None
    reply: Message | None = None
    context = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        message, context, run, fab = _pull_task_input(client)
        t_pulled = time.perf_counter()
        if loaded.app is None or loaded.fab_hash != fab.hash_str:
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            loaded.app = load(run.fab_id, run.fab_version, fab.hash_str)
            loaded.fab_hash = fab.hash_str
        t_loaded = time.perf_counter()
        reply = loaded.app(message=message, context=context)
        t_ran = time.perf_counter()
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # the ClientApp's error goes back to the server, as Flower does
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = str(type(ex)) + ":<'" + str(ex) + "'>"
        if isinstance(ex, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            reason = "An exception was raised when attempting to load `ClientApp`"
        logger.exception("ClientApp raised an exception")
        details = reason
        if message is not None:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        except Exception:  # a broken connection must not end the node's ClientApp process
            logger.exception("could not push the reply of a task")
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    loaded.served += 1
    seconds = time.perf_counter() - t0
    logger.info(
        "pid %d served task %d in %.3f s (%s): pull %.3f s, load %.3f s, run %.3f s, push %.3f s",
        os.getpid(),
        loaded.served,
        seconds,
        sub_status,
        t_pulled - t0,
        t_loaded - t_pulled,
        t_ran - t_loaded,
        time.perf_counter() - t_ran,
    )


def _replace_self(argv: list[str], token: str, fab_hash: str) -> None:
    """``exec`` a fresh interpreter (same PID) that serves ``token`` first."""
    logger.info("app changed (FAB %s): pid %d restarts afresh", fab_hash[:12], os.getpid())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(
        sys.executable,
        [sys.executable, "-m", "sims.clientapp_worker", *argv, "--first-token", token],
    )


def serve(args: argparse.Namespace, argv: list[str]) -> int:
    """Acquire ClientApp tasks from the SuperNode and serve them, until stopped."""
    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    address = args.runtime_api_address
    loaded = Loaded()
    if args.first_token:
        serve_task(address, args.first_token, args.insecure, certificates, loaded)
    base = list(argv)
    if "--first-token" in base:  # never carry a served token into a later exec
        i = base.index("--first-token")
        del base[i : i + 2]
    acquirer = _client(address, args.insecure, certificates, None)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    logger.info("pid %d serves ClientApp tasks of %s", os.getpid(), address)
    wait = args.poll_interval
    try:
        while True:
            res = acquirer.AcquireTask(request)
            if res.HasField("task") and res.token:
                wait = args.poll_interval
                fab = res.task.fab_hash  # the SuperNode names every task's FAB
                # another FAB, or one the task does not name: start afresh, never load a
                # second app into modules the first one imported
                if loaded.fab_hash is not None and fab != loaded.fab_hash:
                    acquirer.close()
                    _replace_self(base, res.token, fab)
                serve_task(address, res.token, args.insecure, certificates, loaded)
                continue
            time.sleep(wait)
            wait = min(2 * wait, max(IDLE_POLL_INTERVAL, args.poll_interval))
    finally:
        acquirer.close()


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m sims.clientapp_worker``."""
    p = argparse.ArgumentParser(
        prog="python -m sims.clientapp_worker",
        description="Serve a SuperNode's ClientApp tasks from one long-lived process",
    )
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's HOST:PORT")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    p.add_argument("--root-certificates", help="CA of the Runtime API's TLS certificate")
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=POLL_INTERVAL,
        help=f"seconds between polls after a task (doubling up to {IDLE_POLL_INTERVAL} s)",
    )
    p.add_argument("--first-token", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, watch the parent, serve."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    try:
        return serve(args, argv)
    except KeyboardInterrupt:  # SIGINT, also from the parent monitor
        return 0


if __name__ == "__main__":
    sys.exit(main())
