"""What every strategy that wraps another shares: federated evaluation is the wrapped one's."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid


class DelegatesEvaluation:
    """Mixin for a wrapping strategy (list it before ``Strategy``): ``configure_evaluate`` and
    ``aggregate_evaluate`` go to :meth:`evaluation_strategy`, by default ``self.inner``."""

    inner: Any

    def evaluation_strategy(self) -> Any:
        """The strategy that runs federated evaluation (the wrapped one)."""
        return self.inner

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy."""
        return self.evaluation_strategy().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate to the wrapped strategy."""
        return self.evaluation_strategy().aggregate_evaluate(server_round, replies)
