"""DP-SGD per client through Opacus (Abadi et al., "Deep Learning with Differential Privacy",
CCS 2016; Opacus, Yousefpour et al. 2021), accounted with RDP (Mironov, CSF 2017).

Each local step: Opacus' ``GradSampleModule`` hooks compute the per-sample gradients, Opacus'
``DPOptimizer.pre_step`` clips each to ``max_grad_norm`` (flat, over all parameters), sums,
adds N(0, σ²C²) from the client's seeded generator and divides by the expected batch size;
that batch gradient replaces the plain one in :func:`clients.local_update.local_update`.

Why not ``PrivacyEngine.make_private``: it wraps model, optimizer *and* data loader, takes the
SGD step itself and keeps the accountant inside the engine. In this simulator the local
update owns the SGD step (FedAvg) or sends the gradient unstepped (FedSGD), batches come from
the seeded sampler the scorer reproduces, and the accountant must outlive the round. So the
same Opacus pieces the engine assembles are used directly: ``GradSampleModule`` (hooks added
and removed around each step, on the plain model: parameter names never get the
``_module.`` prefix), ``DPOptimizer`` (clip, noise, scale) and the RDP accountant's history
(:mod:`clients.defenses.accounting`), kept in the client's ``Context.state`` between rounds.

BatchNorm: per-sample gradients do not exist with batch statistics; the model is checked with
``opacus.validators.ModuleValidator`` and refused with a clear error. Replacing BatchNorm only
on the client would change the architecture under the global model the server sends (names and
buffers differ), so the replacement is done for the whole federation: ``model.name =
"resnet18_gn"`` is ResNet-18 after ``ModuleValidator.fix`` (GroupNorm), on server and clients.

Threat model: as for :mod:`clients.defenses.dynamic_dp`; ε(δ) is a formal per-client bound
for example-level (add/remove) adjacency with Poisson sampling (``poisson = true``,
``epsilon_formal = 1``); for the default fixed-size batches see the caveat in
:mod:`clients.defenses.accounting` (``epsilon_formal = 0``).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from clients.defenses.accounting import AccountedDefense, empty_gradients
from clients.defenses.base import Tensors, TrainingInfo, register_defense


def _num(name: str, value: object, *, low: float, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value > low or (allow_zero and value == 0)):  # type: ignore[operator]
        raise ValueError(
            f"{name} must be a finite number > {low}{' (or 0 = off)' if allow_zero else ''}, "
            f"got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=64)
def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, epochs: float
) -> float:
    """σ reaching (target_epsilon, δ) after ``steps`` steps (or ``epochs`` epochs) at rate q,
    by Opacus' ``get_noise_multiplier`` (binary search over its RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier  # lazy: opacus costs ~50 MB

    horizon = {"steps": steps} if steps else {"epochs": epochs}
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            accountant="rdp",
            **horizon,
        )
    )


@register_defense("dp_sgd")
class DPSGD(AccountedDefense):
    """Opacus DP-SGD on every local step, with an RDP accountant that persists across rounds.

    Parameters
    ----------
    max_grad_norm:
        C, the per-sample clipping norm (1.0).
    noise_multiplier:
        σ (1.0); used unless ``target_epsilon`` is set.
    target_epsilon:
        0 (off) or the ε to reach at δ = ``delta`` after the horizon; σ then comes from
        Opacus' ``get_noise_multiplier`` and needs exactly one of ``steps`` or ``epochs``.
    steps, epochs:
        Horizon of ``target_epsilon``: total local steps of this client over the run (e.g.
        rounds × local_steps when it joins every round), or epochs (steps = epochs / q).
    delta:
        δ of the reported ε(δ) and of ``target_epsilon`` (1e-5).
    poisson:
        false (default): the simulator's fixed-size batches drawn without replacement;
        true: Poisson batches (each example with probability q = batch_size / n, variable
        and possibly empty batches; the sum is divided by the expected size batch_size).
    sample_rate:
        q of the accountant; 0 (default) = batch_size / client dataset size.
    secure_mode:
        Opacus' floating-point-attack-resistant noise (slower).

    Metrics: ``noise_multiplier``, ``epsilon``, ``steps``, ``sample_rate``, ``epsilon_formal``
    (1 only with ``poisson = true``).
    """

    def __init__(
        self,
        *,
        max_grad_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        target_epsilon: float = 0.0,
        steps: int = 0,
        epochs: float = 0.0,
        delta: float = 1e-5,
        poisson: bool = False,
        sample_rate: float = 0.0,
        secure_mode: bool = False,
    ) -> None:
        super().__init__(delta=delta, sample_rate=sample_rate, poisson=poisson)
        self.max_grad_norm = _num("max_grad_norm", max_grad_norm, low=0)
        self.noise_multiplier = _num("noise_multiplier", noise_multiplier, low=0)
        self.target_epsilon = _num("target_epsilon", target_epsilon, low=0, allow_zero=True)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0 (0 = unset), got {steps!r}")
        self.steps, self.epochs = steps, _num("epochs", epochs, low=0, allow_zero=True)
        if self.target_epsilon and (bool(steps) == bool(self.epochs)):
            raise ValueError(
                "target_epsilon needs exactly one horizon: steps (total local steps) or epochs"
            )
        if not isinstance(secure_mode, bool):
            raise ValueError(f"secure_mode must be true or false, got {secure_mode!r}")
        self.secure_mode = secure_mode
        self.sigma = self.noise_multiplier

    def begin(self, model: nn.Module, info: TrainingInfo) -> None:
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator

        super().begin(model, info)
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(
                f"dp_sgd: the model is not DP-compatible ({errors[0]}); choose a model without "
                "BatchNorm (e.g. model.name = 'resnet18_gn', GroupNorm via ModuleValidator.fix)"
            )
        if self.target_epsilon:
            self.sigma = noise_for_target(
                self.target_epsilon, self.delta, self.q, self.steps, self.epochs
            )
        params = [p for p in model.parameters() if p.requires_grad]
        expected = (
            (info.expected_batch_size or info.batch_size) if self.poisson else info.batch_size
        )
        self._params = dict(
            zip([n for n, p in model.named_parameters() if p.requires_grad], params, strict=True)
        )
        self._optimizer = DPOptimizer(
            torch.optim.SGD(params, lr=0.0),
            noise_multiplier=self.sigma,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=max(1, expected),
            loss_reduction="mean",
            secure_mode=self.secure_mode,
        )
        for p in params:
            del p.summed_grad  # set by DPOptimizer; set again around each step only

    def per_sample_gradients(
        self, model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, Tensors]:
        if x.shape[0] == 0:  # an empty Poisson batch: no gradient, only noise
            return empty_gradients(model, names)
        from opacus import GradSampleModule

        named = dict(model.named_parameters())
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        try:
            with warnings.catch_warnings():
                # inputs need no gradient, so torch notes the first layer's hook fires on outputs only
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss = F.cross_entropy(gsm(x), y)
                loss.backward()
            grads = {n: named[n].grad_sample.detach() for n in names}
        finally:
            gsm._close()  # removes the hooks and Opacus' attributes from the parameters
            for n in names:
                named[n].grad = None
        return loss.detach(), grads

    def reduce_per_sample(self, grads: Tensors, *, generator: torch.Generator) -> Tensors:
        opt = self._optimizer
        device = next(iter(self._params.values())).device
        # Opacus draws the noise on the parameters' device; derive a generator there from ours.
        opt.generator = (
            generator
            if device.type == "cpu"
            else torch.Generator(device=device).manual_seed(
                int(torch.randint(0, 2**62, (1,), generator=generator))
            )
        )
        for n, p in self._params.items():  # the attributes DPOptimizer reads; removed again below
            p.grad_sample, p.summed_grad = grads[n], None
        try:
            if not opt.pre_step():
                raise RuntimeError("Opacus skipped the step (virtual steps are not used here)")
            out = {n: p.grad.detach().clone() for n, p in self._params.items()}
        finally:
            opt.zero_grad(set_to_none=True)
            for p in self._params.values():  # leave no Opacus attribute on the model
                for attr in ("grad_sample", "summed_grad"):
                    if hasattr(p, attr):
                        delattr(p, attr)
        self.account(self.sigma)
        self.record("noise_multiplier", self.sigma)
        return out
