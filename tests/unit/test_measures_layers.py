"""Known-answer tests of Mo et al.'s per-layer measures (arXiv:2105.13929): Jacobian
sensitivity, subspace distance and V-information, on tiny models and synthetic data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adversaries.measures._common import layer_groups, per_sample_layer_gradients
from adversaries.measures.sensitivity import (
    exact_sensitivity,
    jacobian_sensitivity,
    summarize_sensitivity,
)
from adversaries.measures.subspace import (
    group_subspace_distance,
    layer_subspace_distance,
    principal_angles,
    subspace_distance,
)
from adversaries.measures.vinfo import layer_v_information, plot_layer_table, v_information

torch.set_num_threads(1)


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 5),
        nn.Sigmoid(),
        nn.Linear(5, 3),
    ).double()


def _batch(n: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def test_layer_groups() -> None:
    assert layer_groups(tiny_cnn()) == {"0": [0, 1], "3": [2, 3], "5": [4, 5]}


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_within_error_bars_of_exact(probe: str) -> None:
    model = tiny_cnn()
    x, y = _batch()
    est = jacobian_sensitivity(
        model, x, y, n_probes=64, probe=probe, generator=torch.Generator().manual_seed(0)
    )
    exact = exact_sensitivity(model, x, y)
    assert [(r.layer, r.sample) for r in est] == [(r["layer"], r["sample"]) for r in exact]
    for r, e in zip(est, exact, strict=True):
        assert r.sq_frobenius_stderr > 0
        # Unbiased estimator of ‖·‖_F²; 4 standard errors (plus float rounding).
        assert (
            abs(r.sq_frobenius - e["sq_frobenius"])
            <= 4 * r.sq_frobenius_stderr + 1e-12 * e["sq_frobenius"]
        )
        assert r.normalized == pytest.approx(r.frobenius / math.sqrt(r.d_params * r.d_input))


def test_forward_mode_route_equals_double_backward() -> None:
    model = tiny_cnn()
    x, y = _batch()
    a = jacobian_sensitivity(model, x, y, n_probes=4, generator=torch.Generator().manual_seed(5))
    b = jacobian_sensitivity(
        model, x, y, n_probes=4, method="forward", generator=torch.Generator().manual_seed(5)
    )
    for ra, rb in zip(a, b, strict=True):
        assert ra.sq_frobenius == pytest.approx(rb.sq_frobenius, rel=1e-10)


def test_summary_averages_over_samples() -> None:
    model = tiny_cnn()
    x, y = _batch(3)
    rows = jacobian_sensitivity(
        model, x, y, n_probes=8, layers=["0", "5"], generator=torch.Generator().manual_seed(1)
    )
    table = summarize_sensitivity(rows)
    assert [t["layer"] for t in table] == ["0", "5"]
    first = [r.frobenius for r in rows if r.layer == "0"]
    assert table[0]["sensitivity"] == pytest.approx(sum(first) / 3)
    assert table[0]["n_samples"] == 3 and table[0]["d_params"] == 2 * 9 + 2
    with pytest.raises(ValueError, match="unknown layer"):
        jacobian_sensitivity(model, x, y, layers=["nope"])


def test_principal_angles_known_answers() -> None:
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=torch.float64))[0]
    mixed = basis @ torch.randn(3, 3, generator=g, dtype=torch.float64)  # same span, other basis
    assert torch.allclose(
        principal_angles(basis, mixed), torch.zeros(3, dtype=torch.float64), atol=1e-7
    )
    q = torch.linalg.qr(torch.randn(10, 6, generator=g, dtype=torch.float64))[0]
    angles = principal_angles(q[:, :3], q[:, 3:])
    assert torch.allclose(angles, torch.full((3,), math.pi / 2, dtype=torch.float64), atol=1e-10)
    assert subspace_distance(angles) == pytest.approx(math.sqrt(3))
    t = 0.3
    e1 = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    rot = torch.tensor([[math.cos(t)], [math.sin(t)], [0.0]], dtype=torch.float64)
    assert float(principal_angles(e1, rot)[0]) == pytest.approx(t, rel=1e-10)


def test_subspace_distance_equals_projector_distance() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.linalg.qr(torch.randn(8, 2, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(8, 2, generator=g, dtype=torch.float64))[0]
    proj = float((a @ a.T - b @ b.T).norm()) / math.sqrt(2)
    assert subspace_distance(principal_angles(a, b)) == pytest.approx(proj, rel=1e-9)


def test_layer_subspace_identical_and_orthogonal_groups() -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))[0]
    ga = torch.randn(20, 3, generator=g, dtype=torch.float64) @ q[:, :3].T  # rows span q[:, :3]
    gb = torch.randn(15, 3, generator=g, dtype=torch.float64) @ q[:, 3:].T
    gsame = torch.randn(25, 3, generator=g, dtype=torch.float64) @ q[:, :3].T
    (orth,) = layer_subspace_distance({"l": ga}, {"l": gb}, k=3)
    (same,) = layer_subspace_distance({"l": ga}, {"l": gsame}, k=3)
    assert (
        orth.k == 3
        and orth.distance == pytest.approx(math.sqrt(3))
        and orth.normalized_distance == pytest.approx(1)
    )
    assert all(a == pytest.approx(math.pi / 2) for a in orth.angles)
    assert same.distance == pytest.approx(0.0, abs=1e-7)
    (capped,) = layer_subspace_distance(
        {"l": ga}, {"l": gb}, k=10
    )  # rank 3: only 3 directions exist
    assert capped.k == 3


def test_group_subspace_distance_on_model() -> None:
    model = tiny_cnn()
    x, y = _batch(6)
    xx, yy = torch.cat([x, x]), torch.cat([y, y])
    group = torch.tensor([0] * 6 + [1] * 6)
    res = group_subspace_distance(model, xx, yy, group, k=4)
    assert [r.layer for r in res] == ["0", "3", "5"]
    assert all(r.distance == pytest.approx(0.0, abs=1e-6) for r in res)
    grads = per_sample_layer_gradients(model, x, y)
    assert grads["5"].shape == (6, 5 * 3 + 3)


def _perfect_features(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of the classifier of a softmax regression: the bias part is
    p − e_y, negative exactly at the label, so the layer encodes Y perfectly (and linearly)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, k)).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return per_sample_layer_gradients(model, x, y)["1"], y


def test_vinfo_of_perfectly_encoded_label_is_entropy() -> None:
    feats, y = _perfect_features(1500, 4, 0)
    res = v_information(feats, y, generator=torch.Generator().manual_seed(0))
    # Y uniform on 4 classes: H(Y) = ln 4. H_V(Y) on 450 held-out samples is within ~0.01 nats of
    # ln 4 (class frequencies deviate by ~2%, a second-order effect on the cross-entropy); a
    # separable target leaves a held-out NLL ≈ 0. Tolerance 0.05 nats ≈ 3.6% of H(Y).
    assert res.h_y == pytest.approx(math.log(4), abs=0.02)
    assert res.h_y_given_g < 0.05
    assert res.v_information == pytest.approx(math.log(4), abs=0.05)
    assert res.n_test == 450 and res.n_classes == 4


def test_vinfo_of_independent_noise_is_zero() -> None:
    g = torch.Generator().manual_seed(1)
    n, d = 3000, 16
    feats = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=g)
    res = v_information(feats, y, generator=torch.Generator().manual_seed(2))
    # No information: the estimate can only be positive by chance (4 standard errors); it can be
    # negative by overfitting, which for logistic regression costs ≈ d(K−1)/(2 n_train) nats
    # of held-out NLL (the AIC penalty); allow twice that.
    assert res.v_information <= 4 * res.stderr
    assert res.v_information >= -(4 * res.stderr + d / res.n_train)


def test_layer_table_and_plot(tmp_path) -> None:
    feats, y = _perfect_features(400, 3, 2)
    noise = torch.randn(400, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    table = layer_v_information(
        {"fc": feats, "noise": noise},
        y,
        generator=torch.Generator().manual_seed(4),
        families=("logistic",),
    )
    assert [row["layer"] for row in table] == ["fc", "noise"]
    assert table[0]["v_information"] > table[1]["v_information"] + 0.5
    assert {"h_y", "h_y_given_g", "stderr", "nll_logistic", "best_family"} <= set(table[0])
    assert table[0]["h_y"] == table[1]["h_y"]  # one shared split
    out = plot_layer_table(table, tmp_path / "plots" / "vinfo.png", title="V-information")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="families"):
        v_information(feats, y, families=("svm",))
