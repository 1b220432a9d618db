"""Update transforms: pruning, signSGD, quantisation and additive noise.

Each maps the update (or each local step's gradient, with ``apply_to = "step"``) to a dict of
tensors of the same shapes. They are the mechanisms T of Li et al. (arXiv:2408.16913, CCS 2024,
methods.md section 1: pruning, signSGD) and the defenses Zhu et al. tried against DLG
(NeurIPS 2019, methods.md section 6: Gaussian/Laplacian noise, fp16/int8, pruning).
"""

from __future__ import annotations

import math

import torch

from clients.defenses.base import Tensors, TensorTransform, register_defense


def _choice(param: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{param} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return str(value)


def num_zeroed(ratio: float, numel: int) -> int:
    """Entries pruning zeroes in a tensor of ``numel`` entries: ``round(ratio * numel)``."""
    return min(numel, math.floor(ratio * numel + 0.5))


@register_defense("pruning")
class Pruning(TensorTransform):
    """Gradient pruning: zero the ``ratio`` share of entries with the smallest magnitude.

    Li et al. (arXiv:2408.16913), "zero the p% smallest-|g| entries"; Zhu et al. (DLG,
    NeurIPS 2019) report that more than 20% sparsity stops DLG.

    Parameters
    ----------
    ratio:
        Fraction of entries zeroed, in [0, 1]; ``round(ratio * n)`` entries of each tensor
        (``scope = "layer"``) or of all tensors together (``"global"``) are zeroed, the rest
        (the largest magnitudes; ties broken by position) kept unchanged.
    scope:
        ``"layer"`` (top-k per tensor) or ``"global"`` (one top-k over the whole update).
    apply_to:
        ``"update"`` or ``"step"`` (see :class:`~clients.defenses.base.TensorTransform`).

    Metric ``kept_fraction``: share of entries the mask keeps.
    """

    def __init__(self, *, ratio: float, scope: str = "layer", apply_to: str = "update") -> None:
        super().__init__(apply_to=apply_to)
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or not 0.0 <= ratio <= 1.0
        ):
            raise ValueError(f"ratio (fraction zeroed) must be a number in [0, 1], got {ratio!r}")
        self.ratio = float(ratio)
        self.scope = _choice("scope", scope, ("layer", "global"))

    @staticmethod
    def _keep_mask(flat: torch.Tensor, n_zero: int) -> torch.Tensor:
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        keep = flat.numel() - n_zero
        if keep > 0:
            mask[torch.topk(flat.abs(), keep, sorted=False).indices] = True
        return mask

    def masks(self, tensors: Tensors) -> dict[str, torch.Tensor]:
        """The boolean keep-mask of each tensor."""
        if self.scope == "layer":
            return {
                n: self._keep_mask(
                    t.detach().reshape(-1), num_zeroed(self.ratio, t.numel())
                ).reshape(t.shape)
                for n, t in tensors.items()
            }
        if not tensors:
            return {}
        flat = torch.cat([t.detach().reshape(-1) for t in tensors.values()])
        mask = self._keep_mask(flat, num_zeroed(self.ratio, flat.numel()))
        sizes = [t.numel() for t in tensors.values()]
        return {
            n: m.reshape(t.shape)
            for (n, t), m in zip(tensors.items(), mask.split(sizes), strict=True)
        }

    def transform(self, tensors: Tensors, *, generator: torch.Generator) -> Tensors:
        masks = self.masks(tensors)
        total = sum(t.numel() for t in tensors.values())
        self.record("kept_fraction", sum(int(m.sum()) for m in masks.values()) / max(1, total))
        return {n: t * masks[n].to(t.dtype) for n, t in tensors.items()}


@register_defense("signsgd")
class SignSGD(TensorTransform):
    """signSGD: send ``scale · sign(g)`` (Bernstein et al., ICML 2018), one of the five
    defenses of Li et al. (arXiv:2408.16913); ``sign(0) = 0``.

    Parameters
    ----------
    scale:
        A number > 0 (every entry becomes −scale, 0 or +scale), or ``"l1"``: per tensor, the
        mean |g| (the scaled sign of Karimireddy et al. 2019, which keeps the magnitude).
    apply_to:
        ``"update"`` or ``"step"``.
    """

    role = "sign"
    exclusive = True

    def __init__(self, *, scale: float | str = 1.0, apply_to: str = "update") -> None:
        super().__init__(apply_to=apply_to)
        numeric = isinstance(scale, (int, float)) and not isinstance(scale, bool)
        if not (scale == "l1" or (numeric and scale > 0 and math.isfinite(scale))):
            raise ValueError(f"scale must be a number > 0 or 'l1', got {scale!r}")
        self.scale = scale

    def transform(self, tensors: Tensors, *, generator: torch.Generator) -> Tensors:
        out = {}
        for n, t in tensors.items():
            s = t.abs().mean() if self.scale == "l1" else float(self.scale)  # type: ignore[arg-type]
            out[n] = torch.sign(t) * s
        return out


@register_defense("quantization")
class Quantization(TensorTransform):
    """Quantise and de-quantise every tensor, as a client sending low-precision updates
    would (Zhu et al., DLG, NeurIPS 2019: fp16 does not defend, int8 does).

    Parameters
    ----------
    dtype:
        ``"int"``: symmetric per-tensor integer quantisation with ``bits`` bits,
        q = clamp(round(x / s), −L, L), s = max|x| / L, L = 2^(bits−1) − 1, sent as q·s
        (the round-trip error is at most s/2); ``"fp16"`` or ``"bf16"``: cast and back.
    bits:
        2..16, for ``dtype = "int"`` only (8 = int8).
    apply_to:
        ``"update"`` or ``"step"``.

    Metric ``max_abs_error``: the largest round-trip error over the update.
    """

    role = "quantize"
    exclusive = True

    def __init__(self, *, dtype: str = "int", bits: int = 8, apply_to: str = "update") -> None:
        super().__init__(apply_to=apply_to)
        self.dtype = _choice("dtype", dtype, ("int", "fp16", "bf16"))
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ValueError(f"bits must be an integer in 2..16, got {bits!r}")
        if self.dtype != "int" and bits != 8:
            raise ValueError(f"bits applies to dtype 'int' only (dtype is {dtype!r})")
        self.bits = bits

    def quantize(self, t: torch.Tensor) -> torch.Tensor:
        """The round trip of one tensor."""
        if self.dtype == "fp16":
            return t.to(torch.float16).to(t.dtype)
        if self.dtype == "bf16":
            return t.to(torch.bfloat16).to(t.dtype)
        levels = 2 ** (self.bits - 1) - 1
        scale = t.detach().abs().max() / levels if t.numel() else t.new_zeros(())
        if not scale > 0:
            # all zero, or every magnitude so small (subnormal) that the step underflows to 0:
            # such values are already on the finest grid float can hold; keep them as they are
            return t.clone() if t.numel() and bool(t.ne(0).any()) else torch.zeros_like(t)
        return torch.clamp(torch.round(t / scale), -levels, levels) * scale

    def transform(self, tensors: Tensors, *, generator: torch.Generator) -> Tensors:
        out = {n: self.quantize(t) for n, t in tensors.items()}
        err = max(
            (float((out[n] - t).abs().max()) for n, t in tensors.items() if t.numel()), default=0.0
        )
        self.record("max_abs_error", err)
        return out


@register_defense("noise")
class AdditiveNoise(TensorTransform):
    """Add i.i.d. noise to every entry (Zhu et al., DLG, NeurIPS 2019: Gaussian or Laplacian
    noise of variance ≥ ~1e-2 stops the attack, at an accuracy cost). Not differentially
    private by itself: there is no clipping, so the sensitivity is unbounded.

    Parameters
    ----------
    scale:
        > 0. Gaussian: the standard deviation σ. Laplace: the scale b (density
        exp(−|x|/b)/2b; standard deviation √2·b, mean absolute value b).
    distribution:
        ``"gaussian"`` or ``"laplace"``.
    apply_to:
        ``"update"`` or ``"step"``.

    The noise is drawn on the CPU from the ``generator`` passed in (in parameter order), so
    a seeded generator gives the same noise on any device. Metric ``noise_to_signal``:
    ‖noise‖ / ‖update‖.
    """

    def __init__(
        self, *, scale: float, distribution: str = "gaussian", apply_to: str = "update"
    ) -> None:
        super().__init__(apply_to=apply_to)
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not 0 < scale < math.inf
        ):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)
        self.distribution = _choice("distribution", distribution, ("gaussian", "laplace"))

    def sample(
        self, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator
    ) -> torch.Tensor:
        """Noise of ``shape`` from ``generator`` (CPU)."""
        if self.distribution == "gaussian":
            return torch.randn(shape, generator=generator, dtype=dtype) * self.scale
        # Laplace(0, b) = b·(E1 − E2), E ~ Exp(1) = −log(1 − U), U ∈ [0, 1): never log(0).
        u = torch.rand((2, *shape), generator=generator, dtype=dtype)
        e = -torch.log1p(-u)
        return (e[0] - e[1]) * self.scale

    def transform(self, tensors: Tensors, *, generator: torch.Generator) -> Tensors:
        out, noise_sq, signal_sq = {}, 0.0, 0.0
        for n, t in tensors.items():
            noise = self.sample(t.shape, t.dtype, generator).to(t.device)
            out[n] = t + noise
            noise_sq += float(noise.pow(2).sum())
            signal_sq += float(t.detach().pow(2).sum())
        if signal_sq > 0:
            self.record("noise_to_signal", math.sqrt(noise_sq / signal_sq))
        return out
