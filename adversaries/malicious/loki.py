"""LOKI: customised per-client imprint blocks keep clients apart under secure aggregation.

Zhao, Sharma, Elkordy, Ezzeldin, Avestimehr, Bagchi, "LOKI: Large-scale Data Reconstruction
Attack against Federated Learning through Model Manipulation", IEEE S&P 2024
(arXiv:2303.12233), on top of the imprint block of Fowl, Geiping, Czaja, Goldblum, Goldstein,
"Robbing the Fed", ICLR 2022 (:mod:`adversaries.malicious.imprint`). Own implementation.

Principle. Secure aggregation reveals only the (weighted) sum of the clients' updates, so with
one imprint block shared by all clients the records of every client compete for the same bins
(the block must grow with the total number of records) and a recovered record cannot be
attributed to its client. A malicious server that sends each
client a *customised* model can instead route the records of different clients into disjoint
parameters: then the aggregate of those parameters is, block by block, one client's update
(scaled by its example weight), and imprint recovery reads each block as if it were alone.

Our variant (not the paper's construction). The paper customises convolution kernels in front
of a fully connected imprint layer (its scale-up is quadratic in the model size). Here every
client gets the *same architecture*, a :class:`~fl_privsim.core.architecture.FrontBlock` with
``len(targets) × k`` encoder rows (equal shapes: secure aggregation sums equal-shaped vectors),
and the customisation is which rows are live: client ``targets[j]`` gets rows
``[j·k, (j+1)·k)`` with the imprint weights and offsets of :class:`Imprint` (``k`` bins, the
same bins in every block), and every other row switched *off*: zero weights and bias
``OFF_BIAS < 0``, so its pre-activation is that negative constant for every input, its ReLU (or
clamp) output and slope are zero, its weight and bias gradients are exactly zero, and it never
moves during any number of local steps. The size of a model is linear in the number of
clients (``N·k`` rows of ``C·H·W`` weights). The decoder columns and bias are the same in every
client's model and may receive updates from every client; only the encoder rows must be
separable. The imprint scale calibration (FedAvg drift, perturbation) is computed once for ``k``
rows and holds per block, since a client's block is exactly an imprint block of ``k`` rows.

Expected leakage. Per client ``n = batch_size × local_steps`` records fall in its own ``k``
bins, so the expected share of records alone in their bin (recovered exactly) is
``(1 - 1/k)^(n-1)`` (:func:`~adversaries.malicious._imprint_bins.expected_alone_share`),
independent of the number of clients. The default ``k = 4n`` gives
``(1 - 1/(4n))^(n-1) ≈ e^{-1/4} ≈ 0.78`` (0.80 for ``n = 8``), within the 76–86 % of images
the paper reports leaked across 100 clients in one FedAvg round. Measured (MNIST, ``mlp``,
batch 8, 3 seeds; FedAvg: 4 steps, lr 0.1): asr 0.79–0.83 FedSGD and 0.75–0.81 FedAvg for 10
clients, 0.76–0.85 and 0.76–0.79 for 50, every client leaking (leakage rate 1.0).

What it adds over one shared imprint block of the same ``N·k`` rows: that block's expected
alone share ``(1 - 1/(Nk))^(Nn-1)`` is about the same (measured FedSGD asr 0.70–0.85 for 10
clients), but its recoveries cannot be told apart by client; here block ``j`` holds only
``targets[j]``'s records, so every recovered record is attributed to its client, and a
client's bins never drift under another client's local steps. The price: every model has
``N·k`` rows, so the server holds ``N`` models of ``N·k·C·H·W`` encoder weights (quadratic in
``N``: 100 clients of MNIST under FedAvg, ``k = 128``, took 17 GB of RAM to simulate).

Detectability: the off rows are zero rows beside non-zero ones
(:mod:`clients.defenses.model_inspection`'s ``zero_rows`` flags them), and the per-client
models differ, which a client comparing models with others would notice.
Pure torch; no Flower or Ray.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar, cast

import torch
from torch import nn

from adversaries.base import ATTACKS, AttackResult, Observation
from adversaries.malicious._imprint_bins import expected_alone_share
from adversaries.malicious.base import Crafted, Modification, ServerView, register_modification
from adversaries.malicious.imprint import (
    BIAS,
    WEIGHT,
    Imprint,
    ImprintAttack,
    check_block_update,
    recover_bins,
)
from fl_privsim.core.architecture import FrontBlock, FrontBlockModel
from fl_privsim.core.errors import ConfigError, ThreatModelError

__all__ = [
    "AUTO_BINS_PER_RECORD",
    "OFF_BIAS",
    "VARIANTS",
    "Loki",
    "LokiAttack",
    "auto_bins",
    "expected_alone_share",
]

log = logging.getLogger(__name__)

VARIANTS = ("sparse", "cumulative")
#: Bias of a switched-off encoder row (its weights are zero): any negative value kills it.
OFF_BIAS = -1.0
#: ``bins_per_client = 0`` gives ``k = AUTO_BINS_PER_RECORD × records_per_update`` bins.
AUTO_BINS_PER_RECORD = 4


def auto_bins(records_per_update: int) -> int:
    """Bins per client for ``bins_per_client = 0``: ``4 n`` (at least 2), so that the expected
    alone share ``(1 - 1/(4n))^(n-1)`` is about ``e^{-1/4} ≈ 0.78`` (0.80 for ``n = 8``)."""
    return max(2, AUTO_BINS_PER_RECORD * max(int(records_per_update), 1))


@register_modification("loki")
class Loki(Modification):
    """Per-client imprint rows so a secure sum keeps clients apart (after LOKI, S&P 2024).

    LOKI's customised models (Zhao et al., IEEE S&P 2024) with Robbing the Fed's imprint
    block (Fowl et al., ICLR 2022): one block of ``k`` rows per targeted client, live only in
    that client's model (see the module docstring for our variant of the paper's construction).

    Threat model: a malicious server that may send every client its own weights of one common
    architecture (a front block before the agreed model) and sees only the securely aggregated
    (weighted mean) update; it uses its public data to place the bins, never a client's data.

    Parameters
    ----------
    bins_per_client:
        Rows ``k`` of each client's block (0, default: :func:`auto_bins`, ``4 ×
        records_per_update``; otherwise >= 2).
    variant:
        ``"sparse"`` (default; clamp rows, one row per bin, the more robust over FedAvg's local
        steps) or ``"cumulative"`` (ReLU rows, differences of neighbouring rows).
    measurement, distribution, drift, ratio, perturbation:
        As in :class:`~adversaries.malicious.imprint.Imprint`, applied to each block.
    """

    changes_architecture: ClassVar[bool] = True

    def __init__(
        self,
        *,
        bins_per_client: int = 0,
        variant: str = "sparse",
        measurement: str = "brightness",
        distribution: str = "gaussian",
        drift: float = 1.0,
        ratio: float | None = None,
        perturbation: float = 1e-4,
    ) -> None:
        whole = isinstance(bins_per_client, int) and not isinstance(bins_per_client, bool)
        if not whole or bins_per_client < 0 or bins_per_client == 1:
            raise ValueError(
                f"bins_per_client must be 0 (auto) or an integer >= 2, got {bins_per_client!r}"
            )
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.bins_per_client = int(bins_per_client)
        self.variant = variant
        self.options: dict[str, Any] = {
            "measurement": measurement,
            "distribution": distribution,
            "drift": drift,
            "ratio": ratio,
            "perturbation": perturbation,
        }
        self._imprint(2)  # validates the imprint options (ValueError, one line)

    def _imprint(self, bins: int) -> Imprint:
        return Imprint(bins=bins, variant=self.variant, **self.options)

    def check_model(
        self, model: nn.Module, input_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        """As :meth:`Imprint.check_model`: the block fronts any model of (C, H, W) inputs."""
        try:
            self._imprint(2).check_model(model, input_shape, num_classes)
        except ConfigError as err:
            raise ConfigError(str(err).replace("imprint:", "loki:", 1)) from None

    def craft(self, model: nn.Module, view: ServerView) -> Crafted:
        """One model per target (``per_client``), all of one front-block architecture.

        ``model`` of the result (what a target without its own entry would get, and what the
        aggregate is read against) is the first target's. Secrets: ``variant``,
        ``bins_per_client`` (``k``), ``rows`` (``N·k``), ``clients`` (the targets, in block
        order), ``blocks`` (``{client id: [start, end)}`` rows), ``expected_alone_share``,
        ``off_bias``, and the imprint secrets of one block: ``measurement``,
        ``distribution``, ``direction``, ``boundaries``, ``sigma``, ``ratio``,
        ``encoder_scale``, ``decoder_scale``.
        """
        targets = tuple(int(c) for c in view.targets)
        if not targets:
            raise ConfigError("loki: no targeted client in this round")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"loki: targets repeat a client: {targets}")
        # checked as (C, H, W) by check_model
        shape = cast(tuple[int, int, int], tuple(int(v) for v in view.input_shape))
        self.check_model(model, shape, view.num_classes)
        k = self.bins_per_client or auto_bins(view.records_per_update)
        one, isec = self._imprint(k).build_block(model, view)
        n, d = len(targets), shape[0] * shape[1] * shape[2]
        rows = n * k
        shared = FrontBlock(shape, rows, one.activation)
        with torch.no_grad():
            shared.encoder.weight.zero_()
            shared.encoder.bias.fill_(OFF_BIAS)
            shared.decoder.weight.copy_(one.decoder.weight.repeat(1, n))
            shared.decoder.bias.copy_(one.decoder.bias)
            shared.upper.copy_(one.upper.repeat(n))
        honest = copy.deepcopy(model)
        device = next((p.device for p in honest.parameters()), torch.device("cpu"))
        per_client: dict[int, nn.Module] = {}
        for j, client in enumerate(targets):
            block = copy.deepcopy(shared)
            with torch.no_grad():
                block.encoder.weight[j * k : (j + 1) * k].copy_(one.encoder.weight)
                block.encoder.bias[j * k : (j + 1) * k].copy_(one.encoder.bias)
            per_client[client] = FrontBlockModel(block.to(device), copy.deepcopy(honest))
        alone = expected_alone_share(max(view.records_per_update, 1), k)
        log.info(
            "loki: %d clients x %d bins (%s), %d rows of %d, expected alone share %.3f",
            n,
            k,
            self.variant,
            rows,
            d,
            alone,
        )
        secrets: dict[str, Any] = {
            **{
                key: isec[key]
                for key in (
                    "measurement",
                    "distribution",
                    "direction",
                    "boundaries",
                    "sigma",
                    "ratio",
                    "encoder_scale",
                    "decoder_scale",
                )
            },
            "variant": self.variant,
            "bins_per_client": k,
            "rows": rows,
            "clients": list(targets),
            "blocks": {c: [j * k, (j + 1) * k] for j, c in enumerate(targets)},
            "expected_alone_share": alone,
            "off_bias": OFF_BIAS,
        }
        arch = {"front_block": {"rows": rows, "activation": one.activation}}
        first = copy.deepcopy(per_client[targets[0]])
        return Crafted(model=first, arch=arch, secrets=secrets, per_client=per_client)


@ATTACKS.register("loki")
class LokiAttack(ImprintAttack):
    """Recover every client's records from the aggregate of LOKI's customised models (Zhao
    et al., IEEE S&P 2024; imprint recovery of Fowl et al., ICLR 2022, block by block).

    Threat model: a malicious server that sent the :class:`Loki` models this round (secrets in
    ``obs.server_secrets["loki"]``) and sees the update of ``block.encoder.weight`` and
    ``block.encoder.bias``: one client's, or the weighted mean of several (secure aggregation);
    FedSGD gradient or FedAvg delta. Each block's rows were trained by its client only, and
    imprint ratios are scale-free, so every block is read with
    :func:`~adversaries.malicious.imprint.recover_bins` as a lone client's update: at most
    ``batch_size × local_steps`` bins per block (the largest ``|Δb|`` first), kept when
    ``|Δb|`` exceeds ``tol`` times the block's largest. No ground truth is used.

    Returns the reconstructions of all blocks (block order, then row order), in the
    normalised input space, clamped to the input box; no labels. Metrics: ``blocks``,
    ``bins``, ``nonempty_bins`` (kept), ``candidate_bins`` (above ``tol``), ``leaking_blocks``
    (blocks with at least one reconstruction).

    Parameters
    ----------
    tol:
        Relative threshold on ``|Δb|`` within a block (>= 0, default 1e-6).
    """

    modification: ClassVar[str | None] = "loki"
    requires: ClassVar[tuple[str, ...]] = (
        "the server sent LOKI's customised models in this round (its secrets are present)",
        "the update holds block.encoder.weight and block.encoder.bias of the sent block",
    )

    def check(self, obs: Observation) -> None:
        """Refuse an observation whose update lacks the block or disagrees with the secrets."""
        sec = self.secrets(obs)
        if sec.get("variant") not in VARIANTS:
            raise ThreatModelError(f"loki: unknown variant {sec.get('variant')!r} in the secrets")
        k, rows = int(sec.get("bins_per_client", -1)), int(sec.get("rows", -1))
        spans = sorted(tuple(int(v) for v in span) for span in dict(sec.get("blocks", {})).values())
        if (
            k < 1
            or rows != k * len(spans)
            or spans != [(j * k, (j + 1) * k) for j in range(len(spans))]
        ):
            raise ThreatModelError(f"loki: the secrets' blocks do not tile {rows} rows of {k}")
        check_block_update(obs, "loki", rows)

    def run(
        self, obs: Observation, *, device: torch.device, generator: torch.Generator
    ) -> AttackResult:
        """Reconstruct the non-empty bins of every client's block (see the class docstring)."""
        sec = self.secrets(obs)
        per_block = max(1, obs.batch_size * max(obs.local_steps, 1))
        if obs.num_examples > 0:
            per_block = min(per_block, int(obs.num_examples))
        gw, gb = obs.update[WEIGHT], obs.update[BIAS]
        parts, candidates, leaking = [], 0, 0
        for start, end in sorted(tuple(int(v) for v in span) for span in sec["blocks"].values()):
            flat, found = recover_bins(
                gw[start:end], gb[start:end], sec["variant"], tol=self.tol, cap=per_block
            )
            parts.append(flat)
            candidates += found
            leaking += int(flat.shape[0] > 0)
        d = int(gw.shape[1])
        flat = torch.cat(parts) if parts else torch.zeros(0, d, dtype=torch.float64)
        x = flat.float().view(-1, *obs.input_shape)
        lo, hi = obs.input_bounds()
        x = torch.maximum(torch.minimum(x, hi), lo)
        metrics = {
            "blocks": float(len(parts)),
            "bins": float(gb.numel()),
            "nonempty_bins": float(x.shape[0]),
            "candidate_bins": float(candidates),
            "leaking_blocks": float(leaking),
        }
        return AttackResult(inputs=x.to(device), labels=None, metrics=metrics)
