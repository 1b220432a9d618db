"""Dense-layer de-mixing (Eloul et al., arXiv:2204.12495), used by the ``analytic`` attack.

For a first layer that is the whole classifier (softmax regression), a batch gradient is
``∇W = Aᵀ X`` with ``A[n, k] = (p[n, k] - y[n, k]) / N``: :func:`demix_dense` solves it by
least squares from ``p = 1/K`` and refines ``p = softmax(X Wᵀ + b)`` to a fixed point.
The same holds for the squared-error loss on the softmax (``loss="mse"``, Eloul et al.'s
loss choice, :mod:`clients.defenses.losses`), with its coefficients (:func:`coefficients`)
and label counts (:func:`loss_counts`). Pure torch; no Flower or Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adversaries.base import Observation
from adversaries.reconstruction._common import PASS_THROUGH, first_layer, leaf_modules
from adversaries.reconstruction.label_counts import bias_counts, counts_to_labels, largest_remainder

#: Values of the ``demix`` parameter.
DEMIX_MODES = ("auto", "on", "off")
#: Relative singular-value cutoff of the least-squares solves (below it a direction is
#: treated as null, i.e. the minimum-norm solution is taken along it).
RCOND = 1e-10
EPS = torch.finfo(torch.float64).eps
#: Training losses the de-mixing models (mean over the N samples; see :func:`coefficients`).
DEMIX_LOSSES = ("cross_entropy", "mse")


def coefficients(
    p: torch.Tensor, labels: torch.Tensor, n: int, loss: str = "cross_entropy"
) -> torch.Tensor:
    """``A[n, k] = ∂L/∂z[n, k]`` of the mean loss at softmax outputs ``p`` (N, K) and ``labels``.

    ``cross_entropy``: ``(p - y) / N``. ``mse`` (``L = (1/N) Σ_n ‖p_n - y_n‖²``): with
    ``g = 2 (p - y) / N`` the softmax Jacobian gives ``A = p ⊙ (g - Σ_j p_j g_j)``, i.e.
    ``(2/N) p[n, k] (p[n, k] - y[n, k] - ‖p_n‖² + p[n, y_n])``.
    """
    y = F.one_hot(labels.to(p.device), p.shape[1]).to(p.dtype)
    if loss == "cross_entropy":
        return (p - y) / n
    if loss == "mse":
        g = 2.0 * (p - y) / n
        return p * (g - (p * g).sum(1, keepdim=True))
    raise ValueError(f"loss must be one of {', '.join(DEMIX_LOSSES)}, got {loss!r}")


def loss_counts(
    grad_b: torch.Tensor, p_mean: torch.Tensor, n: int, loss: str = "cross_entropy"
) -> torch.Tensor:
    """Label counts (int64, CPU, summing to ``n``) from ``∇b`` with every sample's softmax ≈ ``p_mean``.

    ``cross_entropy``: :func:`bias_counts`, ``c_k = N (p̄_k - ∇b_k)``. ``mse``: summing
    :func:`coefficients` with ``p_n = p̄`` gives ``∇b_k = (2/N) p̄_k (N (p̄_k - ‖p̄‖²) + c·p̄ - c_k)``;
    with ``r_k = N ∇b_k / (2 p̄_k) - N (p̄_k - ‖p̄‖²)`` and ``Σ c = N`` the solution is
    ``c_k = (N + Σ_j r_j) / K - r_k`` (exact at ``p = 1/K`` and whenever all ``p_n`` are equal).
    Unlike cross-entropy, ``∇b_k < 0`` does not prove class ``k`` present (an absent class
    with small ``p̄_k`` can have a negative ``∇b_k``), so no class is forced present.
    """
    if loss == "cross_entropy":
        return bias_counts(grad_b, p_mean, n)[0]
    if loss != "mse":
        raise ValueError(f"loss must be one of {', '.join(DEMIX_LOSSES)}, got {loss!r}")
    gb = grad_b.detach().double().cpu().flatten()
    pm = p_mean.detach().double().cpu().flatten().clamp_min(EPS)
    r = n * gb / (2.0 * pm) - n * (pm - pm.pow(2).sum())
    raw = torch.nan_to_num((n + r.sum()) / gb.numel() - r, nan=0.0, posinf=float(n), neginf=0.0)
    return largest_remainder(raw, n)


def relabel_rows(
    grad_b: torch.Tensor,
    p: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    loss: str,
    max_sweeps: int = 100,
) -> torch.Tensor:
    """Row labels (int64, CPU) that make ``Σ_n A(p_n, y_n)`` match ``∇b``, by greedy single changes.

    For a loss whose bias gradient is not linear in the softmax (``mse``), the counts from the
    mean softmax (:func:`loss_counts`) are approximate once the rows' ``p_n`` differ. Starting
    from ``labels``, the single-row change that lowers ``‖Σ_n A_n - ∇b‖`` most is applied
    until none lowers it (at most ``max_sweeps`` changes); each row's coefficients use its own
    ``p_n`` (the current de-mixed estimate).
    """
    g_b = grad_b.detach().double().flatten().to(p.device)
    k = p.shape[1]
    every = torch.arange(k, device=p.device).repeat(p.shape[0])
    rows = coefficients(p.double().repeat_interleave(k, 0), every, n, loss).reshape(
        p.shape[0], k, k
    )
    lab = labels.to(p.device).clone()
    idx = torch.arange(p.shape[0], device=p.device)
    total = rows[idx, lab].sum(0)
    best = float((total - g_b).norm())
    for _ in range(max_sweeps):
        trial = total.unsqueeze(0).unsqueeze(0) - rows[idx, lab].unsqueeze(1) + rows  # (N, K, K)
        err = (trial - g_b).norm(dim=2)
        flat = int(torch.argmin(err))
        if float(err.flatten()[flat]) >= best * (1 - 1e-12):
            break
        i, c = divmod(flat, k)
        best, lab[i] = float(err.flatten()[flat]), c
        total = rows[idx, lab].sum(0)
    return lab.cpu()


def condition_number(a: torch.Tensor) -> float:
    """2-norm condition number ``σ_1 / σ_N`` of an (N, R) coefficient matrix (N samples).

    ``σ_N`` is the N-th singular value, taken as 0 when ``R < N`` (then the N rows cannot
    be independent). A singular matrix reports ``1 / eps`` (about 4.5e15) instead of inf.
    """
    s = torch.linalg.svdvals(a.detach().double())
    n = a.shape[0]
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 1.0 / EPS
    smallest = float(s[n - 1]) if s.numel() >= n else 0.0
    return float(min(float(s[0]) / max(smallest, float(s[0]) * EPS), 1.0 / EPS))


def solve_rows(coef_t: torch.Tensor, target: torch.Tensor, rcond: float = RCOND) -> torch.Tensor:
    """Minimum-norm least squares ``argmin_X ‖coef_t X - target‖`` via the SVD.

    ``coef_t`` is (R, N), ``target`` (R, d); returns (N, d). Singular values below
    ``rcond · σ_1`` are dropped (as ``numpy.linalg.lstsq``), which works on any device
    (``torch.linalg.lstsq`` on CUDA assumes full rank).
    """
    u, s, vh = torch.linalg.svd(coef_t, full_matrices=False)
    keep = s > rcond * s[0] if s.numel() else s.bool()
    x: torch.Tensor = vh[keep].T @ ((u[:, keep].T @ target) / s[keep, None])
    return x


def _realign(old: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-row labels with the multiset ``counts``, keeping as many rows' labels as possible."""
    need = counts.clone()
    new = torch.full_like(old, -1)
    for i, c in enumerate(old.tolist()):
        if need[c] > 0:
            new[i], need[c] = c, need[c] - 1
    free = torch.nonzero(new < 0).flatten()
    new[free] = counts_to_labels(need)
    return new


@dataclass
class DemixResult:
    """Outcome of :func:`demix_dense` (everything float64 on the input's device)."""

    #: De-mixed inputs, one row per sample, (N, d).
    x: torch.Tensor
    #: Labels of the rows, int64 (N,) on CPU.
    labels: torch.Tensor
    #: Condition number of the coefficient matrix A (N, K) of the last solve.
    cond: float
    #: Fixed-point iterations run.
    iterations: int
    #: Relative change of X in the last iteration.
    change: float
    #: ``‖A(X)ᵀ X - ∇W‖ / ‖∇W‖`` with A recomputed at the returned X and its labels.
    residual: float
    #: ``‖A(X)ᵀ 1 - ∇b‖ / ‖∇b‖`` likewise.
    bias_residual: float
    #: Whether the last change fell below the tolerance with stable label counts.
    converged: bool


def demix_dense(
    grad_w: torch.Tensor,
    grad_b: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    n: int,
    *,
    iterations: int = 100,
    tol: float = 1e-10,
    memory: int = 5,
    loss: str = "cross_entropy",
) -> DemixResult:
    """De-mix a dense softmax-CE layer's batch gradient (Eloul et al., arXiv:2204.12495).

    With ``loss="mse"`` every ``(p - y) / n`` below is :func:`coefficients` of that loss, the
    first counts come from :func:`loss_counts` at ``p = 1/K`` (exact there) and later rows are
    relabelled against ``∇b`` by :func:`relabel_rows` (the mse bias gradient is not linear in
    ``p``). Same fixed point idea; it converges less reliably: on hand-made 7-class float64
    gradients (N = 5, distinct labels) exact in 27 iterations at weight scale 0.1, not
    converged after 200 at scale 0.3 (cross-entropy: 17 and 27 iterations).

    Model: logits ``z_n = W x_n + b``, loss the mean cross-entropy over ``n`` samples, so
    ``∇W = Aᵀ X``, ``∇b = Aᵀ 1`` with ``A[n, k] = (p[n, k] - y[n, k]) / n``.

    1. Label counts ``c_k = n (p̄_k - ∇b_k)`` (:func:`bias_counts`, largest-remainder
       rounding; classes with ``∇b_k < 0`` are present), with ``p̄ = 1/K`` at first.
    2. ``p = 1/K``; ``A = (p - y) / n``; ``X = (Aᵀ)⁺ ∇W`` (float64 SVD least squares).
    3. Fixed point: ``p = softmax(X Wᵀ + b)``; counts re-estimated with ``p̄ = mean p``
       (rows keep their labels where possible); ``A = (p - y) / n``; re-solve; stop when
       ``‖ΔX‖/‖X‖ < tol`` with unchanged counts, or after ``iterations``.
    4. Return the iterate with the smallest self-consistency residual
       ``‖A(X)ᵀ X - ∇W‖/‖∇W‖ + ‖A(X)ᵀ 1 - ∇b‖/‖∇b‖`` (the last one when it converges;
       this guards against the oscillations seen when the system is underdetermined).

    Distinct labels give a well-conditioned A and an exact recovery; samples sharing a
    label enter with nearly equal coefficients (equal at ``p = 1/K``) and stay mixed. The
    rows of A sum to zero, so rank(A) ≤ K - 1: at most ``K - 1`` samples can be de-mixed.

    Parameters
    ----------
    grad_w, grad_b:
        ``∇W`` (K, d) and ``∇b`` (K,) of the mean loss.
    weight, bias:
        The layer's current ``W`` (K, d) and ``b`` (K,).
    n:
        Number of samples (equal weights ``1/n``).
    iterations, tol:
        Fixed-point budget and relative-change tolerance.
    memory:
        Anderson-acceleration memory of the fixed point on ``p`` (:func:`_anderson`);
        0 is the plain iteration of the paper (same fixed point, often slower).
    loss:
        The clients' training loss, one of :data:`DEMIX_LOSSES` (the attacker knows it).
    """
    if loss not in DEMIX_LOSSES:
        raise ValueError(f"loss must be one of {', '.join(DEMIX_LOSSES)}, got {loss!r}")
    g_w, g_b = grad_w.double(), grad_b.double().flatten()
    w, b = weight.detach().double(), bias.detach().double().flatten()
    k = g_w.shape[0]
    norm_w, norm_b = g_w.norm().clamp_min(EPS), g_b.norm().clamp_min(EPS)
    p = torch.full((n, k), 1.0 / k, dtype=torch.float64, device=g_w.device)
    counts = loss_counts(g_b, p.mean(0), n, loss)
    labels = counts_to_labels(counts)
    x = torch.zeros(n, g_w.shape[1], dtype=torch.float64, device=g_w.device)
    change, it, converged = math.inf, 0, False
    best: DemixResult | None = None
    outs: list[torch.Tensor] = []  # Anderson history: softmax outputs Φ(p) ...
    diffs: list[torch.Tensor] = []  # ... and residuals Φ(p) - p
    for it in range(1, iterations + 1):
        a = coefficients(p, labels, n, loss)
        x_new = solve_rows(a.T, g_w)
        cond = condition_number(a)
        change = float((x_new - x).norm() / x_new.norm().clamp_min(EPS))
        x, solved_labels = x_new, labels
        p_out = F.softmax(x @ w.T + b, dim=1)
        # Self-consistency of (x, labels): A recomputed at x must reproduce the gradient.
        a_x = coefficients(p_out, solved_labels, n, loss)
        residual = float((a_x.T @ x - g_w).norm() / norm_w)
        bias_residual = float((a_x.sum(0) - g_b).norm() / norm_b)
        if loss == "cross_entropy":
            new_counts = loss_counts(g_b, p_out.mean(0), n, loss)
            stable = bool(torch.equal(new_counts, counts))
        else:  # counts from p̄ are approximate: re-assign rows' labels against ∇b directly
            new_labels = relabel_rows(g_b, p_out, solved_labels, n, loss)
            stable = bool(torch.equal(new_labels, labels))
        converged = change < tol and stable
        if best is None or residual + bias_residual <= best.residual + best.bias_residual:
            best = DemixResult(
                x, solved_labels, cond, it, change, residual, bias_residual, converged
            )
        if converged:
            break
        if not stable and loss == "cross_entropy":
            counts, labels = new_counts, _realign(labels, new_counts)
        elif not stable:
            labels = new_labels
            outs, diffs = [], []
        p = _anderson(p, p_out, outs, diffs, memory)
    assert best is not None
    best.iterations, best.change, best.converged = it, change, converged
    return best


def _anderson(
    p: torch.Tensor,
    p_out: torch.Tensor,
    outs: list[torch.Tensor],
    diffs: list[torch.Tensor],
    memory: int,
) -> torch.Tensor:
    """Next softmax estimate: plain ``Φ(p)``, or Anderson mixing of the last ``memory`` steps.

    Anderson acceleration (type II; Walker & Ni, SIAM J. Numer. Anal. 2011) of the fixed
    point ``p = Φ(p)``: with ``f_i = Φ(p_i) - p_i``, ``γ = argmin ‖f_k - ΔF γ‖`` and
    ``p_{k+1} = Φ(p_k) - ΔG γ``. It changes the speed, not the fixed point; rows keep
    summing to 1 (an affine combination). ``memory = 0`` is the plain iteration.
    """
    if memory <= 0:
        return p_out
    outs.append(p_out.flatten())
    diffs.append((p_out - p).flatten())
    del outs[: -(memory + 1)], diffs[: -(memory + 1)]
    if len(diffs) < 2:
        return p_out
    d_f = torch.stack([diffs[i + 1] - diffs[i] for i in range(len(diffs) - 1)], dim=1)
    d_g = torch.stack([outs[i + 1] - outs[i] for i in range(len(outs) - 1)], dim=1)
    gamma = solve_rows(d_f, diffs[-1].unsqueeze(1))
    mixed = (outs[-1].unsqueeze(1) - d_g @ gamma).reshape(p_out.shape)
    return mixed if bool(torch.isfinite(mixed).all()) else p_out


def dense_classifier(obs: Observation) -> bool:
    """True when the first trainable layer is the whole classifier (softmax regression).

    That is: it is an ``nn.Linear`` with ``num_classes`` outputs, no other parameter is
    trainable, and only pass-through modules (``Flatten``/``Identity``) follow it, so its
    output is the logits of the loss.
    """
    name, layer, _ = first_layer(obs.model)
    if not isinstance(layer, nn.Linear) or layer.out_features != obs.num_classes:
        return False
    prefix = f"{name}." if name else ""
    if any(not p.startswith(prefix) for p in obs.param_names()):
        return False
    leaves = leaf_modules(obs.model)
    where = [leaf for leaf, _ in leaves].index(name)
    return all(isinstance(m, PASS_THROUGH) for _, m in leaves[where + 1 :])
