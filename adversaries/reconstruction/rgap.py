"""R-GAP: closed-form recursive gradient attack on one sample.

Zhu and Blaschko, "R-GAP: Recursive Gradient Attack on Privacy" (ICLR 2021,
arXiv:2010.07733). The attack needs no optimisation: it reads the input of every layer off
the layer's weight gradient and the output recovered one layer above, from the last
layer down to the image, by solving one linear least-squares problem per layer.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from adversaries.base import (
    ATTACKS,
    Attack,
    AttackResult,
    Observation,
    Setup,
    require_cross_entropy,
)
from adversaries.reconstruction._common import (
    infer_labels,
    layer_grads,
)
from adversaries.reconstruction.dlg import class_logits_layer
from fl_privsim.core.errors import ThreatModelError

log = logging.getLogger(__name__)

_NAME = "rgap"
_CHAIN = "a plain chain of bias-free Conv2d/Linear layers with LeakyReLU activations"
#: Largest number of float64 values one scatter chunk may hold when the normal matrix is built.
_CHUNK_VALUES = 1 << 23
#: A last-layer scale counts as an exact root below this relative residual (float32 noise ~1e-7).
_ROOT_RTOL = 1e-3


@dataclass(frozen=True)
class _Layer:
    """One weight layer of the chain and the activation that follows it."""

    index: int  # position among the weight layers, 0 = the one that sees the image
    name: str
    module: nn.Conv2d | nn.Linear
    slope: float | None  # LeakyReLU negative slope after the layer; None: no activation
    in_shape: tuple[int, ...]  # (C, H, W) or (d,)
    out_shape: tuple[int, ...]


def _refuse(why: str) -> ThreatModelError:
    return ThreatModelError(f"{_NAME}: requires {why}")


def parse_chain(model: nn.Module, input_shape: tuple[int, int, int]) -> list[_Layer]:
    """The weight layers of ``model`` if it is a chain R-GAP can invert.

    Leaf modules are read in registration order (shared modules counted at every use);
    allowed are bias-free ``Conv2d`` (zero padding, one group) and ``Linear``, ``LeakyReLU``
    with a positive slope (at most one after each layer; none after the last), ``Identity``
    and ``Flatten``. The chain must end with a ``Linear`` and no convolution may follow a
    ``Linear``. The chain is then run beside ``model`` on a random input: the outputs must
    agree, so a model whose ``forward`` does something the modules do not show is refused.

    Raises
    ------
    ThreatModelError
        Naming the module and the assumption it breaks.
    """
    leaves = [
        (n, m) for n, m in model.named_modules(remove_duplicate=False) if not list(m.children())
    ]
    specs: list[list[Any]] = []  # [name, module, slope]
    for name, mod in leaves:
        kind = type(mod).__name__
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            if mod.bias is not None:
                raise _refuse(f"{_CHAIN}, but {name!r} ({kind}) has a bias")
            if isinstance(mod, nn.Conv2d):
                if specs and isinstance(specs[-1][1], nn.Linear):
                    raise _refuse(f"{_CHAIN}, but the Conv2d {name!r} follows a Linear layer")
                if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                    raise _refuse(
                        f"{_CHAIN} (one group, numeric zero padding), but {name!r} has "
                        f"groups={mod.groups}, padding={mod.padding!r}, padding_mode={mod.padding_mode!r}"
                    )
            specs.append([name, mod, None])
        elif isinstance(mod, nn.LeakyReLU):
            if not specs or specs[-1][2] is not None:
                raise _refuse(f"{_CHAIN}, one activation after each layer, but {name!r} is not one")
            if not mod.negative_slope > 0:
                raise _refuse(
                    f"{_CHAIN} (an invertible slope > 0), but {name!r} has slope {mod.negative_slope}"
                )
            specs[-1][2] = float(mod.negative_slope)
        elif isinstance(mod, (nn.Identity, nn.Flatten)):
            continue
        else:
            raise _refuse(f"{_CHAIN} (Identity/Flatten allowed), but {name!r} is {kind}")
    if not specs or not isinstance(specs[-1][1], nn.Linear):
        raise _refuse(f"{_CHAIN} ending in a Linear classifier, but the model does not end in one")
    if specs[-1][2] is not None:
        raise _refuse(f"{_CHAIN}, the last Linear giving the logits, but an activation follows it")

    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *input_shape), generator=gen).to(device=param.device, dtype=param.dtype)
    layers: list[_Layer] = []
    with torch.no_grad():
        try:
            expected = model(x)
        except RuntimeError as exc:
            raise _refuse(
                f"inputs of shape {tuple(input_shape)}, but the model fails on them: {exc}"
            ) from None
        h = x
        for i, (name, mod, slope) in enumerate(specs):
            if isinstance(mod, nn.Linear):
                h = h.flatten(1)
            in_shape = tuple(h.shape[1:])
            try:
                h = mod(h)
            except RuntimeError as exc:
                raise _refuse(
                    f"{_CHAIN}, but {name!r} does not accept the previous output: {exc}"
                ) from None
            if slope is not None:
                h = F.leaky_relu(h, slope)
            layers.append(_Layer(i, name, mod, slope, in_shape, tuple(h.shape[1:])))
        same = h.shape == expected.shape and torch.allclose(
            h, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max().clamp_min(1e-12))
        )
    if not same:
        raise _refuse(f"{_CHAIN}, but the model's forward is not the chain of its modules")
    return layers


def _conv_geometry(layer: _Layer) -> tuple[int, int, int, int, int, int, int, int, int, int]:
    mod = layer.module
    assert isinstance(mod, nn.Conv2d) and not isinstance(mod.padding, str)  # see parse_chain
    kh, kw = mod.kernel_size
    sh, sw = mod.stride
    ph, pw = mod.padding
    dh, dw = mod.dilation
    _, oh, ow = layer.out_shape
    return kh, kw, sh, sw, ph, pw, dh, dw, oh, ow


def constraint_counts(layer: _Layer) -> tuple[int, int, int]:
    """``(unknowns, gradient constraints, forward constraints)`` of a layer (paper Sec. 4).

    Unknowns are the layer's input entries (padding excluded). The weight gradient
    ``∂L/∂W = k · U(x)`` (``k``: ``O × P`` output gradient, ``U(x)``: ``P × D`` patches) gives
    at most ``min(O, P) · D`` independent equations; the forward pass ``W x = o`` gives
    ``O · P`` (``P`` output positions, ``D = C · kh · kw``). A Linear layer is ``P = 1``.
    """
    if isinstance(layer.module, nn.Conv2d):
        kh, kw, *_, oh, ow = _conv_geometry(layer)
        c = layer.in_shape[0]
        o = layer.module.out_channels
        p, d = oh * ow, c * kh * kw
    else:
        o, p, d = layer.module.out_features, 1, layer.module.in_features
    unknowns = math.prod(layer.in_shape)
    return unknowns, min(o, p) * d, o * p


def _patch_index(layer: _Layer, device: torch.device) -> torch.Tensor:
    """``(P, D)`` flat index into the layer's input of every patch entry; -1 for padding.

    Row ``p`` lists the input entries the output position ``p`` sees, in the order of
    ``weight.flatten(1)``; so ``x.flatten()[idx]`` (padding as 0) is ``unfold(x)ᵀ``.
    """
    if isinstance(layer.module, nn.Linear):
        return torch.arange(layer.module.in_features, device=device).view(1, -1)
    c, h, w = layer.in_shape
    kh, kw, sh, sw, ph, pw, dh, dw, oh, ow = _conv_geometry(layer)

    def ar(n: int) -> torch.Tensor:
        return torch.arange(n, device=device)

    rows = sh * ar(oh).view(oh, 1, 1, 1, 1) + dh * ar(kh).view(1, 1, 1, kh, 1) - ph
    cols = sw * ar(ow).view(1, ow, 1, 1, 1) + dw * ar(kw).view(1, 1, 1, 1, kw) - pw
    chan = ar(c).view(1, 1, c, 1, 1)
    valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    idx = chan * (h * w) + rows * w + cols  # broadcasts to (oh, ow, c, kh, kw)
    idx = torch.where(valid, idx, torch.full_like(idx, -1))
    return idx.reshape(oh * ow, c * kh * kw)


def _scatter_blocks(normal: torch.Tensor, index: torch.Tensor, block: torch.Tensor) -> None:
    """``normal += Σ_b S_bᵀ · block · S_b`` where ``S_b`` selects the entries ``index[b]``.

    ``normal`` is ``(n + 1) × (n + 1)``: its last row and column collect the padding
    entries (``index == -1``, mapped to ``n``) and are discarded by the caller. ``index``
    is ``(B, R)``, ``block`` an ``R × R`` matrix shared by all ``b``; the work is chunked so
    that no intermediate exceeds ``_CHUNK_VALUES`` values.
    """
    trash = normal.shape[0] - 1
    idx = torch.where(index >= 0, index, torch.full_like(index, trash))
    r = idx.shape[1]
    step = max(1, _CHUNK_VALUES // max(r * r, 1))
    for start in range(0, idx.shape[0], step):
        chunk = idx[start : start + step]
        normal.index_put_((chunk[:, :, None], chunk[:, None, :]), block, accumulate=True)


def _scatter_vector(vec: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``vec[index] += values`` for the non-padding entries (``index >= 0``)."""
    keep = index >= 0
    vec.index_add_(0, index[keep], values[keep])


@ATTACKS.register("rgap")
class RGAPAttack(Attack):
    """Recover one input in closed form, layer by layer from the top (R-GAP).

    Threat model: honest-but-curious server that sees **one sample's** gradient (FedSGD,
    batch size 1; or FedAvg with one local step, read as ``-delta / lr``) and knows the
    architecture, the global weights and the loss (softmax cross-entropy). The model must
    be a plain chain of **bias-free** ``Conv2d``/``Linear`` layers with **LeakyReLU**
    activations (invertible), e.g. ``cnn6``; anything else (biases, sigmoid/ReLU, pooling,
    batch norm, skip connections) is refused, as are batches and aggregates of more than
    one sample: R-GAP inverts a single sample.

    **Last layer (multi-class generalisation of the paper's logistic case).** With logits
    ``W x`` and cross-entropy, ``∂L/∂W = g xᵀ`` with ``g = softmax(W x) - onehot(y)``: a
    rank-one matrix. Its leading singular pair gives ``g = c / t`` and ``x = t v`` up to one
    scalar ``t``. The label ``y`` comes from the iDLG sign rule (:func:`infer_labels`); for
    three or more classes it is cross-checked with the rank-one factor, in which exactly one
    entry (the label's, ``p_y - 1 < 0``) has the opposite sign of the others, and that entry
    wins if the two disagree (iDLG's row sums can flip when the features sum negative). The
    sign of ``t`` follows from ``g_y < 0``; its size solves the one remaining scalar
    equation ``softmax(t W v) - onehot(y) = c / t`` in least squares (log-spaced grid, then
    golden-section search from every local minimum). With three or more classes the root
    is unique (log-ratios of the wrong classes' probabilities are linear in ``t``). With two
    classes the equation is the paper's logistic case ``u ℓ'(u) = ⟨w, ∇w⟩``, which can have
    two exact roots; since every later layer is positively homogeneous, the wrong one only
    rescales the image, and the smaller ``|t|`` (the less confident prediction, right for
    an untrained network whose logits differ by less than ~1.28) is taken;
    ``metrics["scale_roots"]`` counts the exact roots.

    **Other layers.** Going down, layer ``l`` has output ``o_l = LeakyReLU⁻¹(x_{l+1})``
    and output gradient ``k_l = ∂L/∂x_{l+1} ⊙ LeakyReLU'(o_l)``. Its input ``x_l`` solves the
    stacked least squares ``[α K; W] x_l = [α ∂L/∂W_l; o_l]`` where ``K x = k_l · U(x)`` is the
    weight gradient (``U``: the patch matrix, i.e. the paper's circulant unrolling) and ``W``
    the forward convolution. Only the unpadded pixels are unknowns, which is the paper's
    padding constraint ``P x = 0``. ``α² = tr(WᵀW) / tr(KᵀK)`` gives both blocks the same
    weight. The normal matrix ``α² KᵀK + WᵀW`` is assembled in float64 directly from the
    patch indices (``KᵀK`` scatters ``k_lᵀ k_l`` once per kernel offset, ``WᵀW`` scatters
    ``W_flatᵀ W_flat`` once per output position) and solved by Cholesky; its numerical
    rank is certified from the Cholesky factor or counted from its eigenvalues (see
    :meth:`_solve`), and a rank-deficient system is solved by the pseudo-inverse on its
    numerical range. Then ``∂L/∂x_l = Wᵀ k_l`` and the recursion continues; the last solve is
    the image, in the normalised input space.

    **Rank analysis (paper's RA-i).** :meth:`check` refuses a model where some layer has
    more unknowns than ``min(O, P)·D`` gradient plus ``O·P`` forward constraints (see
    :func:`constraint_counts`), naming the layer and the deficit. At run time the numerical
    rank of every stacked system is reported as ``metrics["rank_deficit_layerN"]``
    (``N`` = weight-layer index from the input, 0 = first conv), beside the relative
    residual ``metrics["residual_layerN"]``.

    **Precision and cost.** On ``cnn6`` with FedSGD the recovery is exact up to the float32
    round-off of the gradient (pixel errors ~1e-5, PSNR ~110 dB before the metrics' 100 dB
    cap). A FedAvg update read as ``-delta / lr`` loses digits to cancellation when
    ``lr · |g| ≪ |w|`` (on 16×16 images: exact at lr 1, 60-93 dB at lr 0.1, down to 38 dB at
    lr 0.01). A 3×32×32 image on ``cnn6`` takes about 8-17 s on one CPU thread (six
    normal matrices of up to 3468², one Cholesky factorisation and one triangular inverse
    each); it needs about 0.5 GB of memory on top of the model.

    Parameters
    ----------
    rank_rtol:
        Relative singular-value threshold of the numerical rank: a direction counts if its
        singular value in the (weighted) stacked system exceeds ``rank_rtol`` times the
        largest. The default 1e-6 sits above float64 round-off of the normal matrix
        (``√(n·ε) ≈ 1e-6`` for ``n`` ≈ 3000 unknowns).
    """

    requires: ClassVar[tuple[str, ...]] = (
        "a single sample: FedSGD batch of 1, or FedAvg with one local step (num_targets == 1)",
        (
            "model is a plain chain of bias-free Conv2d/Linear layers with LeakyReLU activations "
            "(Identity/Flatten allowed; no pooling, normalisation or skip connections)"
        ),
        "last nn.Linear outputs the class logits; loss is softmax cross-entropy",
        "every layer has at least as many constraints as unknowns (rank analysis RA-i <= 0)",
        "update covers every trainable parameter",
    )

    def __init__(self, *, rank_rtol: float = 1e-6) -> None:
        if not (
            isinstance(rank_rtol, (int, float))
            and not isinstance(rank_rtol, bool)
            and math.isfinite(rank_rtol)
            and 0 < rank_rtol < 1
        ):
            raise ValueError(f"rank_rtol must be a number in (0, 1), got {rank_rtol!r}")
        self.rank_rtol = float(rank_rtol)

    # ------------------------------------------------------------------ threat model
    def check_setup(self, setup: Setup) -> None:
        """Refuse more than one sample, more than one local step, clients trained with another
        loss, or a model R-GAP cannot invert (its chain, classifier and rank analysis)."""
        n = setup.num_targets
        if n != 1:
            known = f", num_examples={setup.num_examples}" if setup.num_examples > 0 else ""
            raise _refuse(
                "a single sample (R-GAP inverts a single sample's gradient), but the observation "
                f"covers up to {n} samples (batch_size={setup.batch_size}, local_steps={setup.local_steps}, "
                f"num_clients={setup.num_clients}{known})"
            )
        if setup.protocol == "fedavg" and setup.local_steps != 1:
            raise _refuse(
                f"one gradient step (FedSGD, or FedAvg with local_steps == 1), but local_steps={setup.local_steps}"
            )
        layers = parse_chain(setup.model, setup.input_shape)
        class_logits_layer(setup.model, setup.num_classes, _NAME)
        require_cross_entropy(setup, _NAME)
        for layer in layers[:-1]:
            unknowns, grad_c, fwd_c = constraint_counts(layer)
            if grad_c + fwd_c < unknowns:
                raise _refuse(
                    "at least as many independent constraints as unknowns at every layer (rank "
                    f"analysis RA-i <= 0), but layer {layer.index} {layer.name!r} "
                    f"({type(layer.module).__name__}) has {unknowns} unknowns and at most "
                    f"{grad_c + fwd_c} constraints ({grad_c} gradient + {fwd_c} forward): "
                    f"deficit {unknowns - grad_c - fwd_c}"
                )

    def check(self, obs: Observation) -> None:
        """:meth:`check_setup`, then refuse a partial update or one of the wrong shapes."""
        self.check_setup(Setup.of(obs))
        try:
            grads = obs.gradient()
        except ThreatModelError as exc:
            raise _refuse(f"an update for every trainable parameter, but {exc}") from None
        params = [p for p in obs.model.parameters() if p.requires_grad]
        for name, g, p in zip(obs.param_names(), grads, params, strict=True):
            if tuple(g.shape) != tuple(p.shape):
                raise _refuse(
                    f"update shapes equal to the parameters', but {name!r} has {tuple(g.shape)} "
                    f"instead of {tuple(p.shape)}"
                )

    # ------------------------------------------------------------------ attack
    def run(
        self, obs: Observation, *, device: torch.device, generator: torch.Generator
    ) -> AttackResult:
        """Reconstruct the one input (shape ``(1, C, H, W)``, float32) and its label.

        ``generator`` is unused: the attack is deterministic.
        """
        start = time.perf_counter()
        layers = parse_chain(obs.fresh_model(device), obs.input_shape)
        grads = [g.detach() for g in obs.gradient()]
        dt = torch.float64
        weights = {ly.name: ly.module.weight.detach().to(device=device, dtype=dt) for ly in layers}
        wgrads = {
            ly.name: layer_grads(obs, grads, ly.name)["weight"].to(device=device, dtype=dt)
            for ly in layers
        }
        metrics: dict[str, float] = {}

        top = layers[-1]
        label, x_next, dx_next = self._last_layer(
            obs, grads, weights[top.name], wgrads[top.name], metrics
        )
        for layer in reversed(layers[:-1]):
            x_next, dx_next = self._invert_layer(
                layer, weights[layer.name], wgrads[layer.name], x_next, dx_next, metrics
            )
        deficits = [v for k, v in metrics.items() if k.startswith("rank_deficit_layer")]
        metrics["rank_deficit_total"] = float(sum(deficits))
        metrics["seconds"] = time.perf_counter() - start
        log.debug("rgap: %s", metrics)
        x = x_next.reshape(1, *obs.input_shape).to(device=device, dtype=torch.float32)
        labels = torch.tensor([label], dtype=torch.int64, device=device)
        return AttackResult(inputs=x, labels=labels, metrics=metrics, labels_per_input=True)

    def _last_layer(
        self,
        obs: Observation,
        grads: list[torch.Tensor],
        weight: torch.Tensor,
        wgrad: torch.Tensor,
        metrics: dict[str, float],
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Label, features ``x`` and ``∂L/∂x`` from the classifier's rank-one gradient."""
        u, s, vh = torch.linalg.svd(wgrad, full_matrices=False)
        c, v = u[:, 0] * s[0], vh[0]
        metrics["fc_rank_one_ratio"] = float(s[1] / s[0]) if s.numel() > 1 and s[0] > 0 else 0.0
        label = idlg = int(infer_labels(obs, grads, 1)[0])
        classes = c.numel()
        if classes >= 3:
            neg, pos = (c < 0).nonzero().flatten(), (c > 0).nonzero().flatten()
            odd = int(neg[0]) if neg.numel() == 1 else int(pos[0]) if pos.numel() == 1 else None
            if odd is not None and odd != label:
                log.info(
                    "rgap: iDLG label %d disagrees with the rank-one sign pattern; using %d",
                    label,
                    odd,
                )
                label = odd
        metrics["label_from_rank_one"] = float(label != idlg)
        sign = -1.0 if float(c[label]) > 0 else 1.0  # g_y = c_y / t < 0
        z = weight @ v
        onehot = torch.zeros_like(c)
        onehot[label] = 1.0

        def residual(tau: torch.Tensor) -> torch.Tensor:
            t = sign * tau.reshape(-1, 1)
            r = torch.softmax(t * z, dim=1) - onehot - c / t
            out: torch.Tensor = (r * r).sum(dim=1)
            return out

        log_tau = torch.linspace(-8.0, 8.0, 3201, dtype=c.dtype, device=c.device)
        res = residual(10.0**log_tau)
        inner = (res[1:-1] <= res[:-2]) & (res[1:-1] <= res[2:])
        minima = (inner.nonzero().flatten() + 1).tolist() or [int(torch.argmin(res))]
        minima = sorted(minima, key=lambda j: float(res[j]))[:8]
        roots = []  # (log10 |t|, relative residual) of each refined local minimum
        golden = (math.sqrt(5.0) - 1.0) / 2.0
        for i in minima:
            lo, hi = float(log_tau[max(i - 1, 0)]), float(log_tau[min(i + 1, log_tau.numel() - 1)])
            for _ in range(80):  # golden-section search on log10 |t|
                a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
                ra, rb = residual(torch.tensor([10.0**a, 10.0**b], dtype=c.dtype, device=c.device))
                if ra <= rb:
                    hi = b
                else:
                    lo = a
            lt = (lo + hi) / 2.0
            fit = float(residual(torch.tensor([10.0**lt], dtype=c.dtype, device=c.device))[0])
            roots.append((lt, math.sqrt(fit) / max(float(c.norm()) / 10.0**lt, 1e-300)))
        exact: list[tuple[float, float]] = []
        for root in sorted(r for r in roots if r[1] < _ROOT_RTOL):
            if not exact or root[0] - exact[-1][0] > 1e-6:  # one root seen from two grid points
                exact.append(root)
        # Two classes can give two exact roots (the paper's non-unique u·ℓ'(u)); the smaller
        # |t| (the less confident prediction) is the one of an untrained network.
        lt, rel = min(exact) if exact else min(roots, key=lambda r: r[1])
        if len(exact) > 1:
            log.warning(
                "rgap: the last layer's scale has %d exact roots; taking the smallest", len(exact)
            )
        metrics["scale_roots"] = float(len(exact))
        metrics["fc_fit_residual"] = rel
        t = sign * 10.0**lt
        g = c / t
        metrics["feature_norm"] = abs(t)  # ‖x‖ of the classifier's input (‖v‖ = 1)
        return label, t * v, weight.T @ g

    def _solve(self, normal: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        """Least-squares solution, numerical rank and a condition-number bound.

        A direction counts towards the rank if its eigenvalue exceeds
        ``tol = rank_rtol² · λ_max`` (singular values of the stacked system above
        ``rank_rtol · σ_max``). The fast path certifies full rank without an
        eigendecomposition: with ``N = L Lᵀ``, ``λ_min ≥ 1 / tr(N⁻¹) = 1 / ‖L⁻¹‖²_F`` and
        ``λ_max ≤ ‖N‖_∞``, so ``1 / ‖L⁻¹‖²_F > rank_rtol² ‖N‖_∞`` proves every eigenvalue is
        above ``tol``. Otherwise the eigenvalues are computed (``eigvalsh``) and counted, and a
        rank-deficient system is solved by the pseudo-inverse on its numerical range. The
        returned bound is ``√(λ_max / λ_min)`` of the stacked system (an upper bound on the
        fast path, exact otherwise; ``inf`` when rank deficient).
        """
        n = normal.shape[0]
        lam_max_ub = float(normal.abs().sum(dim=1).max())
        chol, info = torch.linalg.cholesky_ex(normal)
        if int(info) == 0:
            eye = torch.eye(n, dtype=normal.dtype, device=normal.device)
            chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
            lam_min_lb = 1.0 / float((chol_inv * chol_inv).sum())
            if lam_min_lb > self.rank_rtol**2 * lam_max_ub:
                x = chol_inv.T @ (chol_inv @ rhs)
                return x, n, math.sqrt(lam_max_ub / lam_min_lb)
        eig = torch.linalg.eigvalsh(normal)
        tol = float(eig[-1]) * self.rank_rtol**2
        rank = int((eig > tol).sum())
        if rank == n and int(info) == 0:
            x = torch.cholesky_solve(rhs.unsqueeze(1), chol).squeeze(1)
            return x, n, math.sqrt(float(eig[-1] / eig[0]))
        vals, vecs = torch.linalg.eigh(normal)
        keep = vals > tol
        x = vecs[:, keep] @ ((vecs[:, keep].T @ rhs) / vals[keep])
        return x, int(keep.sum()), math.inf

    def _invert_layer(
        self,
        layer: _Layer,
        weight: torch.Tensor,
        wgrad: torch.Tensor,
        x_next: torch.Tensor,
        dx_next: torch.Tensor,
        metrics: dict[str, float],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve the stacked least squares of one layer; returns its input and ``∂L/∂input``."""
        x_next = x_next.reshape(layer.out_shape)
        dx_next = dx_next.reshape(layer.out_shape)
        if layer.slope is None:
            o, k = x_next, dx_next
        else:
            o = torch.where(x_next > 0, x_next, x_next / layer.slope)
            k = dx_next * torch.where(o > 0, torch.ones_like(o), torch.full_like(o, layer.slope))
        out_ch = weight.shape[0]
        w_flat = weight.reshape(out_ch, -1)  # O × D
        k_flat, o_flat = k.reshape(out_ch, -1), o.reshape(out_ch, -1)  # O × P
        g_flat = wgrad.reshape(out_ch, -1)  # O × D
        idx = _patch_index(layer, weight.device)  # P × D
        n = math.prod(layer.in_shape)

        # Balance the blocks: α² = tr(WᵀW) / tr(KᵀK), both traces read off the patch index.
        valid = (idx >= 0).to(weight.dtype)
        tr_w = float((valid * (w_flat * w_flat).sum(0)[None, :]).sum())
        tr_k = float((valid * (k_flat * k_flat).sum(0)[:, None]).sum())
        alpha2 = tr_w / tr_k if tr_k > 0 else 0.0
        # WᵀW scatters W_flatᵀW_flat at every output position's patch; KᵀK scatters
        # k_flatᵀk_flat at every kernel offset's positions (last row/column: padding).
        normal = torch.zeros(n + 1, n + 1, dtype=weight.dtype, device=weight.device)
        _scatter_blocks(normal, idx, w_flat.T @ w_flat)
        _scatter_blocks(normal, idx.T.contiguous(), alpha2 * (k_flat.T @ k_flat))
        normal = normal[:n, :n].contiguous()
        rhs = torch.zeros(n, dtype=weight.dtype, device=weight.device)
        _scatter_vector(rhs, idx, o_flat.T @ w_flat + alpha2 * (k_flat.T @ g_flat))
        x, rank, cond = self._solve(normal, rhs)
        x_img = x.reshape(1, *layer.in_shape)

        # Diagnostics: relative residual of the stacked system, numerical rank deficit.
        k_b, o_b = k.unsqueeze(0), o.unsqueeze(0)
        if isinstance(layer.module, nn.Conv2d):
            mod = layer.module
            conv: dict[str, Any] = {
                "stride": mod.stride,
                "padding": mod.padding,
                "dilation": mod.dilation,
            }
            fwd = F.conv2d(x_img, weight, **conv)
            # torch.nn.grad is loaded by torch but not re-exported in torch.nn's stubs
            grad_w = torch.nn.grad.conv2d_weight(x_img, weight.shape, k_b, **conv)  # type: ignore[attr-defined]
            dx = torch.nn.grad.conv2d_input(x_img.shape, weight, k_b, **conv)  # type: ignore[attr-defined]
        else:
            fwd = x_img @ weight.T
            grad_w = torch.outer(k, x)
            dx = (k @ weight).unsqueeze(0)
        num = alpha2 * float(((grad_w - wgrad) ** 2).sum()) + float(((fwd - o_b) ** 2).sum())
        den = alpha2 * float((wgrad**2).sum()) + float((o**2).sum())
        metrics[f"residual_layer{layer.index}"] = math.sqrt(num / den) if den > 0 else 0.0
        metrics[f"rank_deficit_layer{layer.index}"] = float(n - rank)
        metrics[f"condition_bound_layer{layer.index}"] = cond
        if rank < n:
            log.warning(
                "rgap: layer %s %r is rank deficient by %d", layer.index, layer.name, n - rank
            )
        return x_img.flatten(), dx.flatten()
