"""R-GAP (Zhu & Blaschko, ICLR 2021) and the cnn6 model: exact closed-form recovery of one
sample, label recovery, rank reporting, and refusals of what the attack cannot invert.

The observations are built with the clients' own update code (:mod:`fl_privsim.engine.offline`);
ground truth stays in the tests. R-GAP is exact up to float32 round-off of the gradient,
so recovered images are compared with a tight PSNR (pixel space, data range 1).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adversaries  # noqa: F401  (registers the attacks)
from adversaries.base import ATTACKS, Observation
from adversaries.reconstruction._common import infer_labels
from fl_privsim.core.errors import ConfigError, ThreatModelError
from fl_privsim.core.metrics import psnr
from fl_privsim.core.models import build_model
from fl_privsim.engine.offline import aggregate_observation, client_observation

CLASSES = 10
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
#: R-GAP is exact; float32 gradients leave errors around 1e-5 in pixels (~100 dB).
EXACT_PSNR = 60.0


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _smooth_image(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """A natural-looking random image in [0, 1]: coarse noise, upsampled and blurred."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    coarse = torch.rand(1, c, max(h // 4, 1), max(w // 4, 1), generator=g)
    img = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return F.avg_pool2d(img, 3, 1, 1, count_include_pad=False).clamp(0, 1)


def _norm(raw: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    c = raw.shape[1]
    return (raw - torch.tensor(mean[:c]).view(1, c, 1, 1)) / torch.tensor(std[:c]).view(1, c, 1, 1)


def _pixels(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    c = x.shape[1]
    return (
        x * torch.tensor(std[:c]).view(1, c, 1, 1) + torch.tensor(mean[:c]).view(1, c, 1, 1)
    ).clamp(0, 1)


def _observe(
    model: nn.Module,
    raw: torch.Tensor,
    y: torch.Tensor,
    *,
    protocol: str = "fedsgd",
    lr: float = 0.1,
    classes: int = CLASSES,
    mean=MEAN,
    std=STD,
) -> Observation:
    c = raw.shape[1]
    return client_observation(
        model,
        [(_norm(raw, mean, std), y)],
        protocol=protocol,
        lr=lr,
        mean=mean[:c],
        std=std[:c],
        num_classes=classes,
    )


def _cnn6(shape=(3, 16, 16), classes=CLASSES, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn6", shape, classes)


def test_cnn6_architecture():
    model = build_model("cnn6", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert [c.out_channels for c in convs] == [12, 36, 36, 36, 64, 128]
    assert all(c.bias is None for c in convs) and model.fc.bias is None
    assert len(acts) == 6 and all(a.negative_slope == 0.2 for a in acts)
    assert (model.fc.in_features, model.fc.out_features) == (3200, 10)  # the paper's 3200
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("cnn6", (1, 16, 16), 4).fc.in_features == 128 * 3 * 3


@pytest.mark.parametrize(("seed", "classes"), [(0, 10), (1, 10), (2, 2)])
def test_recovers_one_image_exactly(seed, classes):
    raw = _smooth_image((3, 16, 16), seed)
    y = torch.tensor([(3 * seed + 1) % classes])
    obs = _observe(_cnn6(classes=classes, seed=seed), raw, y, classes=classes)
    res = ATTACKS.create("rgap")(obs)
    assert res.inputs.shape == (1, 3, 16, 16) and res.inputs.dtype == torch.float32
    assert int(res.labels[0]) == int(y[0])
    assert float(psnr(raw, _pixels(res.inputs))[0]) > EXACT_PSNR
    layers = [k for k in res.metrics if k.startswith("rank_deficit_layer")]
    assert len(layers) == 6 and all(res.metrics[k] == 0.0 for k in layers)
    assert res.metrics["fc_rank_one_ratio"] < 1e-4  # ∂L/∂W_fc = g xᵀ has rank one


def test_fedavg_single_step_is_a_gradient():
    raw = _smooth_image((3, 16, 16), 5)
    y = torch.tensor([7])
    obs = _observe(_cnn6(seed=5), raw, y, protocol="fedavg", lr=1.0)
    res = ATTACKS.create("rgap")(obs)
    assert int(res.labels[0]) == 7
    assert float(psnr(raw, _pixels(res.inputs))[0]) > EXACT_PSNR


def test_real_cifar_image(shared_data):
    from fl_privsim.core.data import load_dataset

    data = load_dataset("cifar10_npz", root=shared_data / "cifar10", image_size=16)
    raw, y = data.images("test", [4]), data.labels("test", [4])
    obs = _observe(_cnn6(seed=4), raw, y, mean=data.mean, std=data.std)
    res = ATTACKS.create("rgap")(obs)
    assert int(res.labels[0]) == int(y[0])
    assert float(psnr(raw, _pixels(res.inputs, data.mean, data.std))[0]) > EXACT_PSNR


def test_label_from_rank_one_factor_when_features_sum_negative():
    """Negative features flip iDLG's row sums; the rank-one sign pattern still finds y."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, CLASSES, bias=False),
    )
    with torch.no_grad():
        model[0].weight.abs_().neg_()  # inputs >= 0 below, so every feature is negative
    raw = _smooth_image((3, 8, 8), 3)
    y = torch.tensor([6])
    obs = _observe(model, raw, y, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert int(infer_labels(obs, obs.gradient(), 1)[0]) != 6  # the iDLG rule fails here
    res = ATTACKS.create("rgap")(obs)
    assert int(res.labels[0]) == 6 and res.metrics["label_from_rank_one"] == 1.0
    assert float(psnr(raw, res.inputs.clamp(0, 1))[0]) > EXACT_PSNR


def test_intermediate_linear_layer():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(64, 32, bias=False),
        nn.LeakyReLU(0.1),
        nn.Linear(32, CLASSES, bias=False),
    )
    raw = _smooth_image((1, 8, 8), 4)
    obs = _observe(model, raw, torch.tensor([2]))
    res = ATTACKS.create("rgap")(obs)
    assert int(res.labels[0]) == 2
    assert float(psnr(raw, _pixels(res.inputs))[0]) > EXACT_PSNR


def test_reports_numerical_rank_deficit():
    """Four identical filters pass the counting check (364 >= 192) but give rank <= 172."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(4 * 64, CLASSES, bias=False),
    )
    with torch.no_grad():
        model[0].weight.copy_(model[0].weight[:1].expand(4, -1, -1, -1))
    obs = _observe(model, _smooth_image((3, 8, 8), 5), torch.tensor([1]))
    res = ATTACKS.create("rgap")(obs)
    # forward rank <= 64 (one distinct channel), gradient rank <= 4 * 27 = 108: deficit >= 20
    assert res.metrics["rank_deficit_layer0"] >= 20
    assert res.metrics["rank_deficit_total"] == res.metrics["rank_deficit_layer0"]
    assert bool(torch.isfinite(res.inputs).all())


def _chain(*mods: nn.Module) -> nn.Module:
    return nn.Sequential(*mods)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (lambda: build_model("mlp", (3, 8, 8), CLASSES), r"'1' \(Linear\) has a bias"),
        (lambda: build_model("lenet", (3, 8, 8), CLASSES), r"'body.0' \(Conv2d\) has a bias"),
        (lambda: build_model("convnet", (3, 8, 8), CLASSES), r"\(Conv2d\) has a bias"),
        (lambda: build_model("resnet18", (3, 16, 16), CLASSES), r"'bn1' is BatchNorm2d"),
        (
            lambda: _chain(
                nn.Conv2d(3, 8, 3, padding=1, bias=False),
                nn.LeakyReLU(0.2),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(128, CLASSES, bias=False),
            ),
            r"'2' is MaxPool2d",
        ),
        (
            lambda: _chain(
                nn.Conv2d(3, 8, 3, padding=1, bias=False),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(512, CLASSES, bias=False),
            ),
            r"'1' is ReLU",
        ),
        (
            lambda: _chain(
                nn.Conv2d(3, 2, 3, padding=1, bias=False),
                nn.LeakyReLU(0.2),
                nn.Flatten(),
                nn.Linear(128, CLASSES, bias=False),
            ),
            (
                r"layer 0 '0' \(Conv2d\) has 192 unknowns and at most 182 constraints "
                r"\(54 gradient \+ 128 forward\): deficit 10"
            ),
        ),
    ],
)
def test_refuses_models_it_cannot_invert(model, match):
    torch.manual_seed(0)
    size = 16 if "bn1" in match else 8  # batch norm needs > 1 value per channel to train
    obs = _observe(model(), _smooth_image((3, size, size), 0), torch.tensor([0]))
    with pytest.raises(ThreatModelError, match="rgap: requires " + ".*" + match):
        ATTACKS.create("rgap")(obs)


def test_refuses_a_forward_that_is_not_the_module_chain():
    class Doubled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.act = nn.LeakyReLU(0.2)
            self.fc = nn.Linear(512, CLASSES, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.act(self.conv(x) + x.mean()).flatten(1))

    obs = _observe(Doubled(), _smooth_image((3, 8, 8), 0), torch.tensor([0]))
    with pytest.raises(ThreatModelError, match="forward is not the chain of its modules"):
        ATTACKS.create("rgap")(obs)


def test_refuses_more_than_one_sample():
    model = _cnn6()
    two = torch.cat([_smooth_image((3, 16, 16), 0), _smooth_image((3, 16, 16), 1)])
    batch = _observe(model, two, torch.tensor([0, 1]))
    attack = ATTACKS.create("rgap")
    with pytest.raises(
        ThreatModelError, match=r"rgap: requires a single sample .* up to 2 samples"
    ):
        attack(batch)
    one = [_observe(model, _smooth_image((3, 16, 16), i), torch.tensor([i])) for i in range(2)]
    with pytest.raises(ThreatModelError, match=r"rgap: requires a single sample .*num_clients=2"):
        attack(aggregate_observation(one))
    steps = dataclasses.replace(
        _observe(model, two[:1], torch.tensor([0]), protocol="fedavg"), local_steps=2
    )
    with pytest.raises(ThreatModelError, match=r"rgap: requires one gradient step .*local_steps=2"):
        attack(steps)


def test_refuses_a_partial_update():
    obs = _observe(_cnn6(), _smooth_image((3, 16, 16), 0), torch.tensor([0]))
    partial = dataclasses.replace(
        obs, update={k: v for k, v in obs.update.items() if k != "fc.weight"}
    )
    with pytest.raises(
        ThreatModelError, match="rgap: requires an update for every trainable parameter"
    ):
        ATTACKS.create("rgap")(partial)


@pytest.mark.parametrize("value", [0, 1.0, -1e-3, float("nan"), "1e-6", True])
def test_bad_rank_rtol(value):
    with pytest.raises(ConfigError, match="rank_rtol"):
        ATTACKS.create("rgap", rank_rtol=value)


def test_quick_reproduction(shared_data, tmp_path):
    from fl_privsim.app.reproduce import run_reproduction

    path, result = run_reproduction("rgap_cnn6", quick=True, out=tmp_path / "run")
    s = result.summary
    assert s["images"] == 1 and s["label_accuracy"] == 1.0
    assert s["psnr_min"] > EXACT_PSNR and s["psnr_mean"] >= s["psnr_min"]
    assert s["rank_deficit_total"] == 0
    assert "49.01" in result.table and (path / "reconstructions.png").is_file()
