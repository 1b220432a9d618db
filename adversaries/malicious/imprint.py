"""Imprint ("Robbing the Fed"): a dense block in front of the model that bins the records.

Fowl, Geiping, Czaja, Goldblum, Goldstein, "Robbing the Fed: Directly Obtaining Private Data
in Federated Learning with Modified Models", ICLR 2022 (arXiv:2110.13057). Own implementation.

Threat model: a malicious server that may send any architecture a client builds from a spec
(:mod:`fl_privsim.core.architecture`); here the agreed model behind a :class:`FrontBlock`. It knows
its own public data of the same domain (``ServerView.public_inputs``, never a client's), the
declared protocol (batch size, local steps, learning rate) and sees the update of the block:
one client's, or a weighted mean of several (secure aggregation does not stop it).

The block (modification :class:`Imprint`). Every encoder row computes the same scalar
measurement ``h(x) = u·x`` of the normalised input (``u`` unit: mean brightness, a random or a
DCT direction) minus an offset ``t_i``; the offsets are quantiles of the distribution the
server expects ``h`` to follow (its public data's empirical one, ``"aux"``, or the normal fitted
to it, ``"gaussian"``), so each bin holds about the same share of records. Row ``i`` is
``z_i = (s/σ)(u·x - t_i)`` (``σ``: std of ``h`` on public data) and every decoder column is the
same small vector ``ε v`` (``v`` a random unit direction), so the block's output is
``x + ε v Σ_i act(z_i) + c``: almost ``x``, and for one record every row gets the same gradient
factor ``γ_n = ε v·∂L/∂y_n``. A record contributes ``γ_n x_n`` to the weight gradient and
``γ_n`` to the bias gradient of each row where its activation has slope 1. Variants:

- ``cumulative`` (ReLU rows): row ``i`` sees every record with ``h > t_i``, so
  ``(∇W_i - ∇W_{i+1}) / (∇b_i - ∇b_{i+1})`` is the record of bin ``(t_i, t_{i+1}]`` when it is
  alone there (the top row alone gives the top bin).
- ``sparse`` (clamp rows, ``min(relu(z_i), s·width_i/σ)``): row ``i`` has slope 1 only on its
  own bin, so ``∇W_i / ∇b_i`` alone gives the record.
- ``one_shot``: two ReLU rows around the median, a bin of mass ``1/N`` with ``N`` the records
  expected in the observed update (``records_per_update × targets``), which maximises the
  chance (≈ 1/e) that exactly one record of a huge aggregate falls in it.

Only records alone in their bin are recovered exactly: for ``n`` i.i.d. records and ``k``
equal-mass bins the expected share is ``(1 - 1/k)^(n-1)`` (:func:`expected_alone_share`).

Scales and FedAvg. For FedSGD the gradient is sent as is and any scale works. Over several
local steps the block trains too: each step moves every row by ``lr γ_n x_n`` (the bins drift,
∝ ``R = ε/s``) and the decoder columns by ``lr a_{n,i} ∂L/∂y_n``, which differs between rows
(∝ ``s/ε``) so that later steps no longer give every row the same factor; the FedAvg delta also
loses precision when it is small against the float32 weights (∝ ``1/R``). The modification
therefore sets ``R`` from the server's public data so that one record's step moves another
record's measurement by ``drift`` bin widths (``drift_per_ratio``; ``drift = 1`` is near the
best on CIFAR-10 for ``mlp``, ``convnet`` and ``resnet18``), and sets ``ε·s`` so that the block
changes a public input by at most ``perturbation`` of its norm (the crafted model's outputs
then match the honest model's up to that perturbation's effect: max |logit difference|
4e-6 for ``convnet``, 2e-5 for ``mlp``, 4e-5 for ``resnet18`` on CIFAR-10). The sparse
variant does not need equal factors across rows and is the more robust one over local steps
(FedAvg asr on ``resnet18``, 2 seeds: 0.80 sparse, 0.55 cumulative, 0.78 records alone).

The attack (:class:`ImprintAttack`) reads the block's update (FedSGD gradient or FedAvg delta;
the ratios are scale-free, and weighted means of clients add up the same way) and returns one
reconstruction per bin that received records. Pure torch; no Flower or Ray.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar, cast

import torch
from torch import nn

from adversaries.base import ATTACKS, Attack, AttackResult, Observation
from adversaries.malicious._imprint_bins import (
    DISTRIBUTIONS,
    MEASUREMENTS,
    alone_share,
    drift_per_ratio,
    expected_alone_share,
    measurement_direction,
    quantiles,
)
from adversaries.malicious.base import Crafted, Modification, ServerView, register_modification
from fl_privsim.core.architecture import FrontBlock, FrontBlockModel
from fl_privsim.core.errors import ConfigError, ThreatModelError

__all__ = [
    "DISTRIBUTIONS",
    "MEASUREMENTS",
    "VARIANTS",
    "Imprint",
    "ImprintAttack",
    "alone_share",
    "expected_alone_share",
    "measurement_direction",
    "recover_bins",
]

log = logging.getLogger(__name__)

VARIANTS = ("cumulative", "sparse", "one_shot")
WEIGHT = "block.encoder.weight"
BIAS = "block.encoder.bias"
_FLOAT_MAX = torch.finfo(torch.float32).max


@register_modification("imprint")
class Imprint(Modification):
    """Robbing the Fed's imprint block (Fowl et al., ICLR 2022) in front of the honest model.

    Threat model: see the module docstring; the server uses its public data only to place the
    bins and to size the block, never a client's data.

    Parameters
    ----------
    bins:
        Number of bins ``k`` (>= 2): rows of the block for ``cumulative`` and ``sparse``;
        ``one_shot`` always uses two rows and ignores it.
    measurement:
        ``"brightness"`` (default), ``"random"`` or ``"dct"``
        (:func:`~adversaries.malicious._imprint_bins.measurement_direction`). On the CIFAR-10
        subset all three put the same share of records alone in their bin, within
        Monte-Carlo noise (256 bins, 64 records, ``gaussian``: 0.781 brightness, 0.777
        random, 0.779 dct; FedSGD asr over 5 seeds with ``convnet``: 0.76, 0.78, 0.81, each
        within 0.02 of its realised alone share). Brightness is the default because it is the
        direction of largest spread of natural images, so its bins are the widest for a
        given row norm and drift least during FedAvg's local steps: FedAvg asr (4 steps of
        16, lr 0.1, 5 seeds, ``convnet``) 0.76 brightness, 0.71 random, 0.73 dct.
    variant:
        ``"cumulative"`` (default, ReLU rows, differences of neighbouring rows), ``"sparse"``
        (clamp rows, one row per bin) or ``"one_shot"`` (two rows, one narrow bin).
    distribution:
        Where the offsets come from: ``"gaussian"`` (default; quantiles of the normal fitted
        to the measurement of the public inputs) or ``"aux"`` (their empirical quantiles). On
        the CIFAR-10 subset (846 public test images) the fitted normal put records alone as
        often as ideal equal-mass bins (0.78 at 256 bins, 64 records; 0.86 at 512 bins, 80
        records) while the empirical quantiles, noisy with ~3 public records a bin, gave 0.75
        and 0.80.
    drift:
        FedAvg only: target shift of one record's measurement caused by another record's
        local step, in median bin widths (> 0; ``one_shot``: in its own bin's width over
        ``sqrt(records_per_update)``, since the shift of all the client's records together
        must not slide the narrow bin away); sets the decoder/encoder scale ratio ``R`` from
        the public data (:func:`~adversaries.malicious._imprint_bins.drift_per_ratio`).
        Smaller: bins move less, but the update loses float32 precision and the rows'
        gradient factors diverge more over the local steps. Measured (256 bins, 4 steps of
        16, lr 0.1, 6 seeds, cumulative): ``mlp`` asr 0.75/0.73/0.71/0.69 at drift
        0.5/1/2/3, ``convnet`` 0.78/0.76/0.76/0.76; ``resnet18`` (2 seeds) ~0.55 from 1 to 5
        and 0.46 at 10.
    ratio:
        Fix ``R = ε/s`` instead (> 0; ``None``, default: from ``drift`` for FedAvg, 1 for
        FedSGD, where it does not matter).
    perturbation:
        Largest change the block makes to a public input, relative to the median input norm
        (> 0, default 1e-4); sets ``ε·s``.
    """

    changes_architecture = True

    def __init__(
        self,
        *,
        bins: int = 256,
        measurement: str = "brightness",
        variant: str = "cumulative",
        distribution: str = "gaussian",
        drift: float = 1.0,
        ratio: float | None = None,
        perturbation: float = 1e-4,
    ) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int):
            raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        if measurement not in MEASUREMENTS:
            raise ValueError(
                f"measurement must be one of {', '.join(MEASUREMENTS)}, got {measurement!r}"
            )
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}"
            )
        if not float(drift) > 0:
            raise ValueError(f"drift must be > 0, got {drift!r}")
        if ratio is not None and not float(ratio) > 0:
            raise ValueError(f"ratio must be > 0 or None, got {ratio!r}")
        if not float(perturbation) > 0:
            raise ValueError(f"perturbation must be > 0, got {perturbation!r}")
        self.bins = int(bins)
        self.measurement = measurement
        self.variant = variant
        self.distribution = distribution
        self.drift = float(drift)
        self.ratio = None if ratio is None else float(ratio)
        self.perturbation = float(perturbation)

    def check_model(
        self, model: nn.Module, input_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        """The block works in front of any model taking (C, H, W) inputs; refused: a shape that
        is not three positive sizes, and ``dct`` on a single-pixel input (no non-constant
        frequency)."""
        shape = tuple(input_shape)
        if len(shape) != 3 or any(int(v) < 1 for v in shape):
            raise ConfigError(
                f"imprint: input shape must be (C, H, W) with positive sizes, got {shape}"
            )
        if self.measurement == "dct" and int(shape[1]) * int(shape[2]) < 2:
            raise ConfigError(
                "imprint: measurement 'dct' needs images of at least 2 pixels; use 'brightness'"
            )

    def _offsets(self, hp: torch.Tensor, sigma: float, view: ServerView) -> torch.Tensor:
        """Row offsets ``t`` (float64, increasing) in measurement units."""
        if self.variant == "one_shot":
            n = max(1, view.records_per_update * max(len(view.targets), 1))
            p = min(0.5, 1.0 / n)
            probs = torch.tensor([0.5 - p / 2, 0.5 + p / 2], dtype=torch.float64)
            return quantiles(hp, probs, self.distribution)
        k = self.bins
        q = quantiles(hp, torch.arange(1, k, dtype=torch.float64) / k, self.distribution)
        q = torch.cummax(q, 0).values  # non-decreasing even with ties in the public data
        low = min(float(q[0]), float(hp.min())) - sigma  # bottom row: below every plausible record
        return torch.cat([torch.tensor([low], dtype=torch.float64), q])

    def craft(self, model: nn.Module, view: ServerView) -> Crafted:
        """The honest model behind the imprint block, and the secrets of the attack.

        Secrets: ``variant``, ``measurement``, ``distribution``, ``rows``, ``bins``,
        ``direction`` (``u``, float32 (C·H·W,)), ``boundaries`` (the row offsets ``t``, float64
        (rows,), in units of ``u·x``), ``sigma``, ``ratio`` (``R = ε/s``), ``encoder_scale``
        (``s``), ``decoder_scale`` (``ε``).
        """
        block, secrets = self.build_block(model, view)
        honest = copy.deepcopy(model)
        device = next((p.device for p in honest.parameters()), torch.device("cpu"))
        sent = FrontBlockModel(block.to(device), honest)
        arch = {"front_block": {"rows": secrets["rows"], "activation": block.activation}}
        return Crafted(model=sent, arch=arch, secrets=secrets)

    def _above_rounding(
        self,
        model: nn.Module,
        view: ServerView,
        u: torch.Tensor,
        v: torch.Tensor,
        t: torch.Tensor,
        sigma: float,
        clamp: bool,
        upper: torch.Tensor,
        gain: float,
        ratio: float,
    ) -> float:
        """The ratio ``R = ε/s`` that lifts a bin's bias gradient to :data:`ROUNDING_MARGIN` times
        ``view.update_resolution`` in the revealed mean (FedSGD, secure aggregation).

        A record's gradient on row ``i`` is ``γ_n x_n`` with ``γ_n = ε v·∂L/∂y_n``: it scales with
        ``ε`` alone, while the ratio ``ΔW/Δb`` is scale-free. The server measures the median
        nonzero bin signal ``|Δb|`` of its public data at the current ``ε`` (one batch of the
        declared size), divides by the targets averaged into the mean, and raises ``ε`` (at a
        fixed gain ``ε·s``, so the model's output changes no more) until it clears the rounding,
        but no further than a quarter of ``view.weight_bound`` on the decoder's weights (SecAgg+
        clips the full model a client sends)."""
        block = _filled_block(view.input_shape, t, sigma, u, v, clamp, upper, gain, ratio)
        probe = FrontBlockModel(block, copy.deepcopy(model).cpu().float())
        n = min(view.public_inputs.shape[0], max(view.batch_size, 1) * 8)
        x, y = view.public_inputs[:n].float(), view.public_labels[:n].long()
        signals = []
        for start in range(0, n, max(view.batch_size, 1)):
            probe.zero_grad()
            loss = nn.functional.cross_entropy(
                probe(x[start : start + view.batch_size]), y[start : start + view.batch_size]
            )
            loss.backward()
            assert block.encoder.bias.grad is not None  # set by backward()
            gb = block.encoder.bias.grad.detach().double()
            db = gb if clamp else torch.cat([gb[:-1] - gb[1:], gb[-1:]])
            signals.append(db.abs()[db.abs() > 0])
        found = torch.cat(signals) if signals else torch.zeros(0, dtype=torch.float64)
        if not found.numel():
            return ratio
        per_bin = float(found.median()) / max(len(view.targets), 1)
        need = ROUNDING_MARGIN * view.update_resolution / max(per_bin, 1e-30)
        # the decoder's weights ε·v must stay well inside what the aggregation clips
        room = view.weight_bound / (4.0 * (gain * ratio) ** 0.5 * float(v.abs().max()))
        if need > room:
            log.warning(
                "imprint: bins reach only %.3g x the aggregation's rounding: a larger eps would "
                "be clipped at %g",
                ROUNDING_MARGIN * room / need,
                view.weight_bound,
            )
            need = room
        if need <= 1.0:
            return ratio
        log.info(
            "imprint: raising eps %.3g-fold so bins clear the aggregation's rounding %.3g",
            need,
            view.update_resolution,
        )
        return ratio * need * need

    def build_block(self, model: nn.Module, view: ServerView) -> tuple[FrontBlock, dict[str, Any]]:
        """The imprint block (on the CPU) placed in front of ``model`` and the secrets of
        :meth:`craft`; ``model`` is only read (to size the block for FedAvg). Reused by
        :class:`adversaries.malicious.loki.Loki`, which tiles the block once per client."""
        # checked as (C, H, W) by check_model
        shape = cast(tuple[int, int, int], tuple(int(v) for v in view.input_shape))
        self.check_model(model, shape, view.num_classes)
        pub = view.public_inputs.detach().to("cpu", torch.float64)
        if pub.shape[0] < 2:
            raise ConfigError("imprint: needs at least 2 public inputs to place its bins")
        d = shape[0] * shape[1] * shape[2]
        u = measurement_direction(self.measurement, shape, view.data_std, view.generator)
        v = torch.randn(d, generator=view.generator, dtype=torch.float64)
        v = v / v.norm()
        hp = pub.flatten(1) @ u
        sigma = float(hp.std())
        if not sigma > 0:
            raise ConfigError("imprint: the measurement is constant on the public inputs")
        t = self._offsets(hp, sigma, view)
        rows = int(t.numel())
        clamp = self.variant == "sparse"
        widths = (t[1:] - t[:-1]) / sigma  # bin widths in std units (the top bin is open)
        upper = torch.cat([widths, torch.tensor([_FLOAT_MAX], dtype=torch.float64)])
        if self.variant == "one_shot":
            # the narrow bin must not slide away under the shift of all the client's records
            # together (about sqrt(records) single shifts), so that counts, not the stretch
            wmed = float(widths[0]) / max(view.records_per_update, 1) ** 0.5
        else:
            wmed = float(widths[1:].median())

        # ratio R = ε/s: how far the local steps may move the bins (module docstring)
        if self.ratio is not None:
            ratio = self.ratio
        elif view.protocol == "fedavg":
            per = drift_per_ratio(
                model,
                view.public_inputs,
                view.public_labels,
                v,
                batch_size=view.batch_size,
                lr=view.lr,
                generator=view.generator,
            )
            ratio = self.drift * wmed / per if per > 0 else 1.0
        else:
            ratio = 1.0
        # gain ε·s: the largest change to a public input is `perturbation` of the median norm
        act = torch.relu((hp[:, None] - t[None, :]) / sigma)
        if clamp:
            act = torch.minimum(act, upper)
        total = act.sum(1)
        spread = float((total - total.mean()).abs().max())
        gain = self.perturbation * float(pub.flatten(1).norm(dim=1).median()) / max(spread, 1e-12)
        s = (gain / ratio) ** 0.5
        eps = (gain * ratio) ** 0.5
        if self.ratio is None and view.protocol == "fedsgd" and view.update_resolution > 0:
            ratio = self._above_rounding(model, view, u, v, t, sigma, clamp, upper, gain, ratio)
            s, eps = (gain / ratio) ** 0.5, (gain * ratio) ** 0.5

        block = _filled_block(
            shape, t, sigma, u, v, clamp, upper, gain, ratio, total_mean=float(total.mean())
        )
        log.info(
            "imprint: %s, %d rows, %s/%s, R=%.3g, s=%.3g, eps=%.3g",
            self.variant,
            rows,
            self.measurement,
            self.distribution,
            ratio,
            s,
            eps,
        )
        secrets: dict[str, Any] = {
            "variant": self.variant,
            "measurement": self.measurement,
            "distribution": self.distribution,
            "rows": rows,
            "bins": 1 if self.variant == "one_shot" else rows,
            "direction": u.float(),
            "boundaries": t.clone(),
            "sigma": sigma,
            "ratio": ratio,
            "encoder_scale": s,
            "decoder_scale": eps,
        }
        return block, secrets


@ATTACKS.register("imprint")
class ImprintAttack(Attack):
    """Recover the records binned by the :class:`Imprint` block (Fowl et al., ICLR 2022).

    Threat model: a malicious server that sent the imprint block this round (its secrets are
    in ``obs.server_secrets["imprint"]``) and sees the update of ``block.encoder.weight`` and
    ``block.encoder.bias``: a FedSGD gradient or a FedAvg delta (any number of local steps),
    of one client or a weighted mean of several. Ratios are scale-free, so neither the
    learning rate nor the number of clients is needed. Nothing the configuration fixes rules it
    out (it keeps :meth:`Attack.check_setup`'s default): the block goes in front of any model
    and the ratio holds for any protocol, batch size and loss; whether the modification fits
    the data is checked before launch (:func:`fl_privsim.app.simulation.check_server_role`).

    A bin's pair ``(ΔW, Δb)`` is the rows' difference (``cumulative``, ``one_shot``) or the
    row itself (``sparse``); its record is ``ΔW / Δb``. Bins are kept when ``|Δb|`` exceeds
    ``tol`` times the largest; at most ``num_examples`` (or ``batch_size × local_steps ×
    num_clients``, if smaller) bins are kept, the largest ``|Δb|`` first, so there are never
    more reconstructions than records. For FedSGD an empty bin's difference is exactly zero
    (identical rows give bitwise identical gradients); for FedAvg the rows' gradient factors
    drift apart after the first step and the delta is rounded to the float32 weights, so
    empty bins get small non-zero differences and the cap decides. A bin holding several
    records gives their ``γ``-weighted mixture.

    Returns one reconstruction per kept bin, in the normalised input space, clamped to the
    input box; no labels. Metrics: ``bins``, ``nonempty_bins`` (kept), ``candidate_bins``
    (above ``tol``, before the cap).

    Parameters
    ----------
    tol:
        Relative threshold on ``|Δb|`` (>= 0, default 1e-6): "~0" against the largest bin.
    """

    modification: ClassVar[str | None] = "imprint"
    requires: ClassVar[tuple[str, ...]] = (
        "the server applied the imprint modification in this round (its secrets are present)",
        "the update holds block.encoder.weight and block.encoder.bias of the sent block",
    )

    def __init__(self, *, tol: float = 1e-6) -> None:
        if not float(tol) >= 0:
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        self.tol = float(tol)

    def check(self, obs: Observation) -> None:
        """Refuse an observation whose update lacks the block or does not match the secrets."""
        sec = self.secrets(obs)
        check_block_update(obs, "imprint", int(sec.get("rows", -1)))
        if sec.get("variant") not in VARIANTS:
            raise ThreatModelError(
                f"imprint: unknown variant {sec.get('variant')!r} in the secrets"
            )

    def run(
        self, obs: Observation, *, device: torch.device, generator: torch.Generator
    ) -> AttackResult:
        """Reconstruct every non-empty bin (see the class docstring)."""
        sec = self.secrets(obs)
        cap = max(
            1,
            min(
                int(obs.num_examples) if obs.num_examples > 0 else 1 << 62,
                obs.batch_size * max(obs.local_steps, 1) * max(obs.num_clients, 1),
            ),
        )
        flat, candidates = recover_bins(
            obs.update[WEIGHT], obs.update[BIAS], sec["variant"], tol=self.tol, cap=cap
        )
        x = flat.float().view(-1, *obs.input_shape)
        lo, hi = obs.input_bounds()
        x = torch.maximum(torch.minimum(x, hi), lo)
        metrics = {
            "bins": float(obs.update[BIAS].numel()),
            "nonempty_bins": float(x.shape[0]),
            "candidate_bins": float(candidates),
        }
        return AttackResult(inputs=x.to(device), labels=None, metrics=metrics)


def recover_bins(
    weight: torch.Tensor, bias: torch.Tensor, variant: str, *, tol: float, cap: int
) -> tuple[torch.Tensor, int]:
    """The records of the non-empty bins of one imprint block's update (Fowl et al., ICLR 2022).

    ``weight`` (rows, D) and ``bias`` (rows,) are the update of the block's encoder (gradient
    or delta, any positive scale). A bin's pair ``(ΔW, Δb)`` is the rows' difference
    (``cumulative``, ``one_shot``) or the row itself (``sparse``), its record ``ΔW / Δb``; bins
    with ``|Δb|`` above ``tol`` times the largest are candidates, and at most ``cap`` of them
    (the largest ``|Δb|`` first) are kept, in row order.

    Returns the kept records (float64, (kept, D), unclamped) and the number of candidates.
    """
    gw = weight.detach().to("cpu", torch.float64)
    gb = bias.detach().to("cpu", torch.float64)
    if variant == "sparse":
        dw, db = gw, gb
    else:
        dw = torch.cat([gw[:-1] - gw[1:], gw[-1:]])
        db = torch.cat([gb[:-1] - gb[1:], gb[-1:]])
        if variant == "one_shot":
            dw, db = dw[:1], db[:1]
    mag = db.abs()
    largest = float(mag.max()) if mag.numel() else 0.0
    keep = mag > tol * largest if largest > 0 else torch.zeros_like(mag, dtype=torch.bool)
    candidates = int(keep.sum())
    idx = torch.nonzero(keep).flatten()
    if idx.numel() > cap:
        idx = idx[torch.argsort(mag[idx], descending=True)[:cap]].sort().values
    return dw[idx] / db[idx, None], candidates


#: How far above the aggregation's rounding a bin's signal is lifted (:meth:`Imprint._above_rounding`):
#: the record ``ΔW/Δb`` then carries a relative error of about 1e-3 (≈ 60 dB).
ROUNDING_MARGIN = 1e3


def _filled_block(
    shape: tuple[int, ...],
    t: torch.Tensor,
    sigma: float,
    u: torch.Tensor,
    v: torch.Tensor,
    clamp: bool,
    upper: torch.Tensor,
    gain: float,
    ratio: float,
    total_mean: float = 0.0,
) -> FrontBlock:
    """The imprint block of rows ``t`` with ``s = √(gain/R)``, ``ε = √(gain·R)`` (module docstring)."""
    rows, d = int(t.numel()), int(u.numel())
    s, eps = (gain / ratio) ** 0.5, (gain * ratio) ** 0.5
    block = FrontBlock(tuple(int(v_) for v_ in shape), rows, "clamp" if clamp else "relu")  # type: ignore[arg-type]
    with torch.no_grad():
        block.encoder.weight.copy_((s / sigma) * u.expand(rows, d))
        block.encoder.bias.copy_(-(s / sigma) * t)
        block.decoder.weight.copy_(eps * v[:, None].expand(d, rows))
        block.decoder.bias.copy_(-eps * s * total_mean * v)
        # finite everywhere: a client sends a buffer's change, and inf - inf is nan
        top = (s * upper).clamp(max=_FLOAT_MAX) if clamp else torch.full((rows,), _FLOAT_MAX)
        block.upper.copy_(top)
    return block


def check_block_update(obs: Observation, who: str, rows: int) -> None:
    """Refuse (``ThreatModelError`` naming ``who``) an update without the front block's encoder,
    or whose encoder is not ``rows`` × the flattened input."""
    missing = [n for n in (WEIGHT, BIAS) if n not in obs.update]
    if missing:
        raise ThreatModelError(f"{who}: the update lacks {missing[0]!r} (was the block sent?)")
    d = int(obs.input_shape[0] * obs.input_shape[1] * obs.input_shape[2])
    shape = tuple(obs.update[WEIGHT].shape)
    if shape != (rows, d) or tuple(obs.update[BIAS].shape) != (rows,):
        raise ThreatModelError(
            f"{who}: the block's update has shape {shape}, the secrets say ({rows}, {d})"
        )
