"""An in-process stand-in for Flower's Grid: it hands each message straight to the
ClientApp's handlers (no Ray, no network), as Flower's own tests build Messages by hand."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from clients.client_app import app as client_app
from clients.client_app import handle_evaluate, handle_query, handle_train

HANDLERS = {
    MessageType.TRAIN: handle_train,
    MessageType.EVALUATE: handle_evaluate,
    MessageType.QUERY: handle_query,
}


class InProcessGrid:
    """``num_clients`` fake SuperNodes with node ids 1000, 1001, ... (partition ids 0, 1, ...)."""

    def __init__(
        self, num_clients: int, run_config: dict | None = None, *, use_client_app: bool = False
    ) -> None:
        """``use_client_app``: route messages through the real ``ClientApp`` (with its mods)
        instead of calling the handlers directly."""
        self.use_client_app = use_client_app
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_clients},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i in range(num_clients)
        }
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Each message's reply, in turn; a reply that took longer than ``timeout`` to compute
        is dropped, as if the clients ran in parallel and the server stopped waiting."""
        replies = []
        for msg in messages:
            self.sent.append(msg)
            handler = client_app if self.use_client_app else HANDLERS[msg.metadata.message_type]
            start = time.monotonic()
            try:
                reply = handler(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - as Flower's simulation worker: an error reply
                reason = str(type(exc)) + ":<'" + str(exc) + "'>"
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
                reply = Message(error, reply_to=msg)
            if timeout is None or time.monotonic() - start <= timeout:
                replies.append(reply)
        return replies
