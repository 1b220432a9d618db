"""Batch de-mixing of the analytic attack (Eloul et al., arXiv:2204.12495): known answers.

Distinct labels through a dense softmax-CE layer are de-mixed exactly; identical labels are
not (A is nearly rank-1); N >= K cannot be (rank(A) <= K - 1). Also: aggregates, FedAvg,
the deeper-model (mlp) refinement, refusals and the quick reproduction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attack_helpers import CLASSES, SHAPE, digits, make_model, matched_psnr, observe, sample
from torch import nn

from adversaries import ATTACKS, Observation
from adversaries.reconstruction._dense_demix import condition_number, demix_dense, solve_rows
from fl_privsim.core.errors import ConfigError, ThreatModelError
from fl_privsim.core.metrics import label_accuracy, match_reconstructions, psnr
from fl_privsim.engine.offline import aggregate_observation

torch.set_num_threads(1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pick(classes: list[int], rng: np.random.Generator) -> list[int]:
    """Distinct digits indices, one per entry of ``classes``."""
    _, y, _, _ = digits()
    out: list[int] = []
    for c in classes:
        pool = [i for i in np.nonzero(y.numpy() == c)[0].tolist() if i not in out]
        out.append(int(rng.choice(pool)))
    return out


def true_cond(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Condition number of the ground-truth coefficient matrix A = (p - y) / N (scorer side)."""
    with torch.no_grad():
        p = F.softmax(model(x).double(), dim=1)
    return condition_number((p - F.one_hot(y, p.shape[1]).double()) / x.shape[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_distinct_labels_are_demixed(n: int, device: str) -> None:
    rng = np.random.default_rng(n)
    for seed in range(3):
        raw, x, y = sample(pick(rng.choice(CLASSES, n, replace=False).tolist(), rng))
        res = ATTACKS.create("analytic")(observe(make_model("linear", seed), x, y), device=device)
        assert res.inputs.shape == (n, *SHAPE) and res.inputs.device.type == device
        assert res.metrics["demixed"] == 1.0 and res.metrics["converged"] == 1.0
        assert matched_psnr(raw, res.inputs).min() > 40.0
        assert label_accuracy(y, res.labels) == 1.0
        assert res.metrics["residual"] < 1e-4


def test_distinct_labels_cifar_like() -> None:
    """Random 3x16x16 'images' with per-channel normalisation, random weights of larger scale."""
    gen = torch.Generator().manual_seed(0)
    shape, k = (3, 16, 16), 10
    mean, std = (0.5, 0.45, 0.4), (0.25, 0.24, 0.26)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    for n in (2, 4, 8):
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, k))
        with torch.no_grad():
            model[1].weight.normal_(0.0, 0.02, generator=gen)
            model[1].bias.normal_(0.0, 0.1, generator=gen)
        raw = torch.rand(n, *shape, generator=gen)
        x = (raw - m) / s
        y = torch.randperm(k, generator=gen)[:n]
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        obs = Observation(
            round=1,
            client_id=0,
            protocol="fedsgd",
            model=model,
            global_params={kk: v.clone() for kk, v in model.state_dict().items()},
            update={"1.weight": grads[0], "1.bias": grads[1]},
            batch_size=n,
            local_steps=1,
            lr=0.1,
            num_examples=n,
            input_shape=shape,
            num_classes=k,
            data_mean=mean,
            data_std=std,
        )
        res = ATTACKS.create("analytic")(obs)
        rec = (res.inputs.double() * s + m).clamp(0, 1)
        perm = torch.as_tensor(match_reconstructions(raw.double(), rec))
        assert psnr(raw.double(), rec[perm]).min() > 40.0
        assert sorted(res.labels.tolist()) == sorted(y.tolist())


def test_identical_labels_stay_mixed() -> None:
    """Same class for all 4: the result is a weighted average, A is (nearly) rank-1."""
    rng = np.random.default_rng(1)
    distinct_psnr, identical_psnr = [], []
    distinct_cond, identical_cond, distinct_true, identical_true = [], [], [], []
    for seed in range(4):
        model = make_model("linear", seed)
        for classes, psnrs, conds, trues in (
            (
                rng.choice(CLASSES, 4, replace=False).tolist(),
                distinct_psnr,
                distinct_cond,
                distinct_true,
            ),
            ([int(rng.integers(CLASSES))] * 4, identical_psnr, identical_cond, identical_true),
        ):
            raw, x, y = sample(pick(classes, rng))
            res = ATTACKS.create("analytic")(observe(model, x, y))
            psnrs.append(matched_psnr(raw, res.inputs))
            conds.append(res.metrics["cond_A"])
            trues.append(true_cond(model, x, y))
            assert label_accuracy(y, res.labels) == 1.0  # counts are exact either way
    distinct_psnr, identical_psnr = np.concatenate(distinct_psnr), np.concatenate(identical_psnr)
    assert distinct_psnr.min() > 40.0
    assert identical_psnr.mean() < 30.0 and identical_psnr.max() < distinct_psnr.min() - 10.0
    # The attack's A for identical labels has equal rows (exactly singular); the true A is
    # nearly rank-1, far worse conditioned than with distinct labels.
    assert min(identical_cond) > 1e6 * max(distinct_cond)
    assert min(identical_true) > 10.0 * max(distinct_true)


def test_batch_of_k_is_underdetermined() -> None:
    """Rows of A sum to zero, so rank(A) <= K - 1: N = K samples cannot all be de-mixed."""
    rng = np.random.default_rng(2)
    raw, x, y = sample(pick(list(range(CLASSES)), rng))
    res = ATTACKS.create("analytic")(observe(make_model("linear", 0), x, y))
    assert res.metrics["cond_A"] > 1e12
    assert (matched_psnr(raw, res.inputs) < 40.0).any()


def test_demix_dense_exact_in_float64() -> None:
    """Hand-made float64 gradients of z = Wx + b: X comes back to ~1e-10."""
    gen = torch.Generator().manual_seed(3)
    k, d, n = 7, 30, 5
    w = torch.randn(k, d, generator=gen, dtype=torch.float64) * 0.3
    b = torch.randn(k, generator=gen, dtype=torch.float64) * 0.3
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randperm(k, generator=gen)[:n]
    a = (F.softmax(x @ w.T + b, dim=1) - F.one_hot(y, k).double()) / n
    res = demix_dense(a.T @ x, a.sum(0), w, b, n, iterations=100, tol=1e-13)
    order = torch.argsort(res.labels)
    torch.testing.assert_close(res.x[order], x[torch.argsort(y)], rtol=0, atol=1e-9)
    assert res.converged and res.cond < 10.0


def test_solve_rows_minimum_norm() -> None:
    """Rank-deficient system: the SVD solve returns numpy's minimum-norm least squares."""
    gen = torch.Generator().manual_seed(4)
    m = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    m[:, 2] = m[:, 0]  # two identical columns
    t = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    ref = np.linalg.lstsq(m.numpy(), t.numpy(), rcond=None)[0]
    np.testing.assert_allclose(solve_rows(m, t).numpy(), ref, atol=1e-10)


@pytest.mark.parametrize("index", [0, 99])
def test_single_sample_exact(index: int) -> None:
    raw, x, y = sample([index])
    res = ATTACKS.create("analytic")(observe(make_model("linear", index), x, y))
    assert matched_psnr(raw, res.inputs)[0] >= 60.0
    assert res.labels.tolist() == y.tolist()


def test_demix_off_leaves_rows_mixed() -> None:
    """Without de-mixing, every ratio row of the dense classifier averages all samples."""
    rng = np.random.default_rng(5)
    raw, x, y = sample(pick(rng.choice(CLASSES, 4, replace=False).tolist(), rng))
    obs = observe(make_model("linear", 0), x, y)
    off = ATTACKS.create("analytic", demix="off")(obs)
    on = ATTACKS.create("analytic")(obs)
    assert off.metrics["demixed"] == 0.0 and matched_psnr(raw, off.inputs).max() < 40.0
    assert matched_psnr(raw, on.inputs).min() > 40.0


def test_aggregate_of_two_clients_is_one_batch() -> None:
    """Equal batch sizes: the FedSGD aggregate is the mean gradient of all 8 samples."""
    rng = np.random.default_rng(6)
    model = make_model("linear", 1)
    classes = rng.choice(CLASSES, 8, replace=False).tolist()
    raw, x, y = sample(pick(classes, rng))
    obs = aggregate_observation([observe(model, x[:4], y[:4]), observe(model, x[4:], y[4:])])
    assert obs.is_aggregate and obs.num_examples == 8
    res = ATTACKS.create("analytic")(obs)
    assert res.inputs.shape[0] == 8
    assert matched_psnr(raw, res.inputs).min() > 40.0
    assert label_accuracy(y, res.labels) == 1.0


def test_fedavg_one_step() -> None:
    rng = np.random.default_rng(7)
    raw, x, y = sample(pick(rng.choice(CLASSES, 4, replace=False).tolist(), rng))
    res = ATTACKS.create("analytic")(observe(make_model("linear", 2), x, y, protocol="fedavg"))
    assert matched_psnr(raw, res.inputs).min() > 40.0


def test_mlp_refinement_recovers_more() -> None:
    """Deeper model: the fixed point on A = dL/dh (auto) beats the grouping alone (off)."""
    rng = np.random.default_rng(8)
    exact_off, exact_auto = 0, 0
    for seed in range(4):
        raw, x, y = sample([int(i) for i in rng.choice(1797, 8, replace=False)])
        obs = observe(make_model("mlp", seed), x, y)
        off = ATTACKS.create("analytic", demix="off")(obs)
        auto = ATTACKS.create("analytic")(obs)
        exact_off += int((matched_psnr(raw, off.inputs) >= 60.0).sum())
        exact_auto += int((matched_psnr(raw, auto.inputs) >= 60.0).sum())
        if auto.metrics.get("refined") == 1.0:
            assert auto.metrics["residual_refined"] < auto.metrics["residual_grouped"]
        assert label_accuracy(y, auto.labels) == 1.0
    assert exact_auto > exact_off, (exact_auto, exact_off)


def test_mnist_sized_batch_of_16_under_a_second() -> None:
    gen = torch.Generator().manual_seed(9)
    torch.manual_seed(9)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x = torch.randn(16, 1, 28, 28, generator=gen)
    y = torch.randint(10, (16,), generator=gen)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    obs = Observation(
        round=1,
        client_id=0,
        protocol="fedsgd",
        model=model,
        global_params={k: v.clone() for k, v in model.state_dict().items()},
        update={"1.weight": grads[0], "1.bias": grads[1]},
        batch_size=16,
        local_steps=1,
        lr=0.1,
        num_examples=16,
        input_shape=(1, 28, 28),
        num_classes=10,
        data_mean=(0.13,),
        data_std=(0.31,),
    )
    res = ATTACKS.create("analytic")(obs)
    assert res.inputs.shape == (16, 1, 28, 28)
    assert res.metrics["seconds"] < 1.0


def test_refuses_lenet() -> None:
    _, x, y = sample([3, 4])
    with pytest.raises(ThreatModelError, match="analytic: requires the first trainable layer"):
        ATTACKS.create("analytic")(observe(make_model("lenet"), x, y))


@pytest.mark.parametrize(
    "params",
    [{"demix": "yes"}, {"demix_iterations": 0}, {"demix_iterations": 2.5}, {"demix_tol": 0.0}],
)
def test_bad_params(params: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(params))):
        ATTACKS.create("analytic", **params)


def test_quick_reproduction(shared_data, tmp_path) -> None:
    from fl_privsim.app.reproduce import run_reproduction

    path, result = run_reproduction("demixing", quick=True, out=tmp_path / "run")
    s = result.summary
    assert s["psnr_random_b8"] > 40.0 and s["recovered_random_b8"] == 1.0
    assert s["psnr_identical_b8"] < s["psnr_random_b8"] - 20.0
    assert s["avd_identical_b8"] > 10.0 * s["avd_random_b8"]
    assert s["label_acc_random_b8"] == 1.0
    assert (path / "table.md").is_file() and (path / "avd_vs_batch.png").is_file()
    assert (path / "examples.png").is_file()
