"""Threat models checked before launch (issue 17, item 1).

``Attack.check_setup`` refuses, before Ray starts, what the configuration already rules out;
``fl_privsim.app.simulation.validate_before_launch`` turns a refusal into one ConfigError line that
names the models (or settings) that would satisfy it. The table test runs every registered
attack against every model of the zoo and checks that the static verdict agrees with the
runtime ``check(obs)`` on a real client update (computed by the client's own code on real
digits, and CIFAR-10 records where ../shared/data has them):

- honest-but-curious attacks: ``check`` on the client's observation;
- malicious-server attacks: the server's secrets exist only once a modification crafted the
  model, so the structural part is checked: the modification (default parameters) crafts the
  model, or refuses it (ConfigError, as before launch), and the attack's ``check`` runs on the
  crafted model's update with the secrets of that round;
- inference attacks: they need the server's knowledge (its auxiliary records), which the test
  supplies from the test split, as the attack runner does, with the run's dataset name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import pytest
import torch

import adversaries  # noqa: F401  (registers the attacks)
from adversaries.base import ATTACKS, Observation, Setup
from adversaries.inference.federated import (
    FederatedInference,
    InferenceObservation,
    ServerKnowledge,
)
from adversaries.malicious import MODIFICATIONS
from adversaries.malicious.base import ServerView
from fl_privsim.app import cli, simulation
from fl_privsim.core import config as config_mod
from fl_privsim.core.data import ImageData, load_dataset
from fl_privsim.core.errors import ConfigError, UserError
from fl_privsim.core.models import MODELS, build_model
from fl_privsim.core.paths import shared_data_dir
from fl_privsim.core.results import RunFolder
from fl_privsim.engine.offline import client_observation
from strategies.attack_runner import MAX_REASONS, AttackPlan, AttackRunner

NAMES = sorted(ATTACKS.names())
#: Train-mode BatchNorm needs two values per channel; digits reach 1x1 in ResNet-18's last block.
BATCH = {"resnet18": 2}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine this is the fastest setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def dataset(name: str) -> ImageData:
    if name == "digits":
        return load_dataset("digits")
    root = shared_data_dir() / "cifar10"
    if not root.is_dir():
        pytest.skip(f"needs ../shared/data/cifar10 (absent): {root}")
    return load_dataset("cifar10_npz", root=str(root), seed=0)


@functools.cache
def honest_observation(data_name: str, model_name: str) -> Observation:
    """One client's FedSGD update of a freshly initialised model on real training records."""
    data = dataset(data_name)
    torch.manual_seed(0)
    model = build_model(model_name, data.input_shape, data.num_classes)
    idx = list(range(BATCH.get(model_name, 1)))
    batch = (data.normalize(data.images("train", idx)), data.labels("train", idx))
    return client_observation(
        model,
        [batch],
        protocol="fedsgd",
        lr=0.1,
        mean=data.mean,
        std=data.std,
        num_classes=data.num_classes,
    )


@functools.cache
def crafted_observation(data_name: str, model_name: str, modification: str) -> Observation | str:
    """The update of the model ``modification`` crafted (with its secrets), or the one-line
    reason the modification refused the model."""
    data, honest = dataset(data_name), honest_observation(data_name, model_name)
    view = ServerView(
        round=1,
        clients=(0,),
        targets=(0,),
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        data_mean=data.mean,
        data_std=data.std,
        protocol="fedsgd",
        batch_size=honest.batch_size,
        local_steps=1,
        lr=0.1,
        public_inputs=data.normalize(data.images("test", slice(0, 200))),
        public_labels=data.labels("test", slice(0, 200)),
        generator=torch.Generator().manual_seed(0),
    )
    try:
        crafted = MODIFICATIONS.create(modification).craft(honest.fresh_model(), view)
    except ConfigError as exc:
        return str(exc)
    idx = list(range(honest.batch_size))
    batch = (data.normalize(data.images("train", idx)), data.labels("train", idx))
    obs = client_observation(
        crafted.model,
        [batch],
        protocol="fedsgd",
        lr=0.1,
        mean=data.mean,
        std=data.std,
        num_classes=data.num_classes,
    )
    return dataclasses.replace(obs, server_secrets={modification: crafted.secrets})


def static_setup(data_name: str, model_name: str, batch_size: int) -> Setup:
    """What the config fixes, as validate_before_launch builds it (its own model, other weights)."""
    data = dataset(data_name)
    torch.manual_seed(1)
    return Setup(
        model=build_model(model_name, data.input_shape, data.num_classes),
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        protocol="fedsgd",
        batch_size=batch_size,
        local_steps=1,
        lr=0.1,
        loss="cross_entropy",
        data_name=data.name,
        model_name=model_name,
        data_mean=data.mean,
        data_std=data.std,
    )


def verdict(check, arg) -> str | None:
    """``None`` when ``check(arg)`` passes, else its refusal."""
    try:
        check(arg)
    except UserError as exc:
        return str(exc)
    return None


def runtime_verdict(name: str, data_name: str, model_name: str) -> str | None:
    attack = ATTACKS.create(name)
    need = getattr(attack, "modification", None)
    if need is not None:  # structural part: the crafted model's update, with the round's secrets
        obs = crafted_observation(data_name, model_name, need)
        return obs if isinstance(obs, str) else verdict(attack.check, obs)
    obs = honest_observation(data_name, model_name)
    if isinstance(
        attack, FederatedInference
    ):  # the server's own records, as the runner attaches them
        data = dataset(data_name)
        aux_x = data.normalize(data.images("test", slice(0, 8)))
        aux_y = data.labels("test", slice(0, 8))
        obs = InferenceObservation.of(
            obs, ServerKnowledge(data.name, aux_x, aux_y, aux_x[:1], aux_y[:1])
        )
    return verdict(attack.check, obs)


@pytest.mark.parametrize("data_name", ["digits", "cifar10"])
def test_static_verdict_agrees_with_the_runtime_check(data_name: str) -> None:
    disagree, refusals = [], 0
    for model_name in MODELS:
        batch = honest_observation(data_name, model_name).batch_size
        for name in NAMES:
            static = verdict(
                ATTACKS.create(name).check_setup, static_setup(data_name, model_name, batch)
            )
            runtime = runtime_verdict(name, data_name, model_name)
            if (static is None) != (runtime is None):
                disagree.append(f"{name} on {model_name}: static {static!r}, runtime {runtime!r}")
            refusals += static is not None
    assert not disagree, "\n".join(disagree)
    # both verdicts occur: analytic refuses the conv nets, rgap all but cnn6, and so on
    assert 0 < refusals < len(MODELS) * len(NAMES)


def test_issue_case_fails_before_launch(monkeypatch, capsys, tmp_path) -> None:
    """model lenet + analytic: exit 2, one line naming analytic, nothing launched or written."""

    def no_launch(*args, **kwargs):
        raise AssertionError("the federation was launched")

    monkeypatch.setattr(simulation, "launch", no_launch)
    out = tmp_path / "run"
    code = cli.main(
        [
            "run",
            "--quiet",
            "--out",
            str(out),
            "--set",
            'model.name="lenet"',
            "--set",
            'attacks=[{name="analytic"}]',
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert (
        err.count("\n") == 0 and "attacks[0] (analytic)" in err and "nn.Linear with bias" in err
    ), err
    assert "models that meet it: mlp, linear" in err, err
    assert not out.exists()


def _config(*overrides: str) -> config_mod.Config:
    return config_mod.load(
        None,
        [
            'federation.device="cpu"',
            "federation.num_clients=2",
            "federation.clients_per_round=2",
            *overrides,
        ],
    )


@pytest.mark.parametrize(
    ("overrides", "attack"),
    [
        (['model.name="lenet"', 'attacks=[{name="analytic"}]'], "analytic"),
        (['model.name="mlp"', "client.batch_size=1", 'attacks=[{name="rgap"}]'], "rgap"),
    ],
)
def test_listed_models_really_pass(overrides: list[str], attack: str) -> None:
    """The listed models are exactly those whose check_setup passes, and each of them passes
    the whole pre-launch validation with the same data and settings."""
    with pytest.raises(ConfigError) as err:
        simulation.validate_before_launch(_config(*overrides))
    line = str(err.value)
    assert line.startswith(f"attacks[0] ({attack}): ") and "\n" not in line
    listed = line.split("models that meet it: ", 1)[1].removesuffix(" (model.name)").split(", ")
    cfg = _config(*overrides)
    base = static_setup("digits", cfg.model.name, cfg.client.batch_size)
    passing = [
        m
        for m in MODELS
        if verdict(
            ATTACKS.create(attack).check_setup,
            dataclasses.replace(base, model=build_model(m, (1, 8, 8), 10), model_name=m),
        )
        is None
    ]
    assert listed == passing and cfg.model.name not in listed
    for model_name in listed:
        simulation.validate_before_launch(_config(*overrides, f'model.name="{model_name}"'))


def test_settings_are_named_when_no_model_helps() -> None:
    """rgap on cnn6 with batches of 4: the fix is the batch size, the aggregate's the sampling."""
    with pytest.raises(
        ConfigError,
        match=r"^attacks\[0\] \(rgap\): requires a single sample.*; "
        r"set client\.batch_size = 1$",
    ):
        simulation.validate_before_launch(_config('model.name="cnn6"', 'attacks=[{name="rgap"}]'))
    simulation.validate_before_launch(
        _config('model.name="cnn6"', "client.batch_size=1", 'attacks=[{name="rgap"}]')
    )
    with pytest.raises(
        ConfigError,
        match=r"\(rgap\): on the round's aggregate, .*num_clients=2\); "
        r"set federation\.clients_per_round = 1 or "
        r"attacks\[0\]\.targets\.aggregate = false$",
    ):
        simulation.validate_before_launch(
            _config(
                'model.name="cnn6"',
                "client.batch_size=1",
                'attacks=[{name="rgap", targets={aggregate=true}}]',
            )
        )


def test_summary_carries_distinct_refusal_reasons(tmp_path) -> None:
    """Runtime refusals still happen (e.g. a batch that is larger than planned); the summary
    keeps the distinct reasons, at most MAX_REASONS, beside the counts."""
    data = dataset("digits")
    torch.manual_seed(0)
    model = build_model("cnn6", data.input_shape, data.num_classes)
    plan = AttackPlan("rgap", ATTACKS.create("rgap"), {1}, set(range(5)))
    runner = AttackRunner(
        plans=[plan],
        scorer=None,
        folder=RunFolder(tmp_path),  # type: ignore[arg-type]
        device=torch.device("cpu"),
        seed=0,
        save_images=False,
    )
    for client, size in enumerate((2, 3, 4, 5, 2)):
        idx = list(range(size))
        obs = client_observation(
            model,
            [(data.normalize(data.images("train", idx)), data.labels("train", idx))],
            protocol="fedsgd",
            lr=0.1,
            mean=data.mean,
            std=data.std,
            num_classes=data.num_classes,
            client_id=client,
        )
        runner.observe(1, [obs])
    row = runner.summary()["rgap"]
    assert row["refused"] == 5.0 and row["attacked"] == 0.0 and "failed_reasons" not in row
    assert len(row["refused_reasons"]) == MAX_REASONS == 3
    assert all(
        f"up to {n} samples" in r for n, r in zip((2, 3, 4), row["refused_reasons"], strict=True)
    )
