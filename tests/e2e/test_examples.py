"""Every example config in ``experiments/`` runs, from a folder other than the repository.

Each ``experiments/*.toml`` is run through the CLI (``fl-privsim run``, ``game`` or ``measure``,
whichever its tables name) with the current directory set to a fresh temporary folder, so
paths inside the file must resolve against the file's own folder. Quick settings shrink the
attacks' iterations and trials (never the training), and a run example's final test accuracy
must beat round 0's, unless the file says why it cannot in a line starting ``# accuracy:``.
Some examples carry extra checks of what they demonstrate (``CHECKS``): every attack that fits
CNN6 or softmax regression runs inside the federation; the inference attacks on Adult score
every attacked update.
"""

from __future__ import annotations

import json
import math
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fl_privsim.app.cli import main
from tests.browser import assert_report_matches_summary, chromium_path

pytestmark = pytest.mark.e2e

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
CPU = ["--set", 'federation.device="cpu"']
GAME = [
    "--set",
    "game.trials=100",
    "--set",
    "game.shadow_trials=100",
    "--set",
    "game.bootstrap=50",
    "--set",
    "model.pretrain_steps=20",
]
QUICK: dict[str, list[str]] = {
    "default": [
        "--set",
        "attacks.1.params.iterations=30",
        "--set",
        "attacks.2.params.iterations=200",
    ],
    "cifar10_npz_mlp": ["--set", "attacks.1.params.iterations=100"],
    "fedavg_aggregate": ["--set", "attacks.1.params.iterations=100"],
    "lenet_digits_batch1": [
        "--set",
        "attacks.0.params.iterations=30",
        "--set",
        "attacks.1.params.iterations=100",
        "--set",
        "attacks.0.targets.clients=[0]",
        "--set",
        "attacks.1.targets.clients=[0]",
    ],
    "inference_property_digits": [
        "--set",
        "attacks.0.targets.rounds=[1, 10]",
        "--set",
        "attacks.1.targets.rounds=[1, 10]",
        "--set",
        "attacks.0.params.shadow_trials=100",
        "--set",
        "attacks.1.params.shadow_trials=100",
    ],
    "all_attacks_cnn6_cifar": [
        "--set",
        "data.image_size=16",
        "--set",
        "attacks.1.params.iterations=10",
        "--set",
        "attacks.2.params.iterations=10",
        "--set",
        "attacks.3.params.iterations=30",
    ],
    "all_attacks_linear_fedavg": [
        "--set",
        "attacks.1.params.iterations=50",
        "--set",
        "attacks.3.params.iterations=10",
        "--set",
        "attacks.4.params.iterations=10",
    ],
    "inference_attacks_adult": [
        arg for i in range(3) for arg in ("--set", f"attacks.{i}.targets.rounds=[1, 2]")
    ],
    "game_attribute_adult": GAME,
    "game_attribute_utkface": GAME,
    "game_property_digits": GAME,
    "measure_i2f": ["--set", "i2f.samples=3"],
    "measure_vinfo": ["--set", "vinfo.samples_per_class=6", "--set", "vinfo.mlp_epochs=20"],
}
INFERENCE = ("attribute_inference", "property_inference", "membership_inference")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _check_cnn6(run: Path, summary: dict) -> None:
    a = summary["attacks"]
    assert (
        a["rgap"]["attacked"] == 2 and a["rgap"]["psnr"] > 40
    )  # R-GAP's closed form is exact here
    assert a["idlg"]["label_accuracy"] == 1.0
    for name in ("dlg", "inverting_gradients"):
        assert a[name]["attacked"] == 2 and a[name]["failed"] == 0 and a[name]["psnr"] > 0
    assert all(a[name]["refused"] == 0 for name in a), a


def _check_linear_fedavg(run: Path, summary: dict) -> None:
    a = summary["attacks"]
    for name in ("analytic", "inverting_gradients", "llg", "dlg", "idlg"):
        assert a[name]["attacked"] == 3 and a[name]["failed"] == 0, name
    assert a["analytic@aggregate"]["attacked"] == 1 and a["llg@aggregate"]["attacked"] == 1
    assert all(a[name]["refused"] == 0 for name in a), a
    # inverting_gradients picked its FedAvg variant and unrolled both local steps
    unrolled = [
        r["value"]
        for r in _metrics(run)
        if r["source"] == "attack/inverting_gradients" and r["key"] == "attack_unrolled_steps"
    ]
    assert unrolled == [2.0] * 3
    # with 2 images per step and a bias, the per-client label counts are exact
    assert a["llg"]["label_accuracy"] == 1.0


def _check_adult_inference(run: Path, summary: dict) -> None:
    """Six clients x rounds 1 and 2, every update scored by each inference attack, with a
    shadow meta-classifier the server trained on its own auxiliary records."""
    rows = _metrics(run)
    for name in INFERENCE:
        a = summary["attacks"][name]
        assert a["attacked"] == 12 and a["failed"] == 0 and a["refused"] == 0, (name, a)
        assert a["trials"] == 12 and 0 <= a["positives"] <= 12
        mine = [r for r in rows if r["source"] == f"attack/{name}"]
        secrets = [r["value"] for r in mine if r["key"] == "secret"]
        assert len(secrets) == 12 and set(secrets) <= {0.0, 1.0}
        assert len([r for r in mine if r["key"] == "score"]) == 12
        assert min(r["value"] for r in mine if r["key"] == "attack_shadow_auc") > 0.7, name
        if 0 < a["positives"] < 12:
            assert 0.0 <= a["auc"] <= 1.0 and a["auc_ci"][0] <= a["auc"] <= a["auc_ci"][1]
        else:
            assert math.isnan(a["auc"])
    # the last-layer update shows whether a Female record was in a batch of two
    assert summary["attacks"]["property_inference"]["auc"] > 0.9


def _check_analytic_exact(run: Path, summary: dict) -> None:
    """A whole run folder, and the analytic attack exact through the MLP's first layer (on the
    real CIFAR-10 subset, and on a user's own folder of images)."""
    for name in ("config.toml", "env.json", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    sources = {r["source"] for r in _metrics(run)}
    assert {"client_train", "server_eval", "attack/analytic"} <= sources
    assert sorted(p.name for p in (run / "attacks" / "round_001").glob("client_*.png"))
    assert summary["attacks"]["analytic"]["psnr"] >= 60


def _check_isolation(run: Path, summary: dict) -> None:
    """Client 3 isolated through real SecAgg+: the analytic attack on the unmasked mean, scored
    against client 3's one record only, recovers it at >= 40 dB (issue 14's acceptance)."""
    assert summary["secure_aggregation"]["mode"] == "secagg+"
    assert summary["server"]["crafted"]["1"] == {
        "isolation": [3],
        "decoys": [0, 1, 2, 4, 5, 6, 7, 8, 9],
    }
    rows = [r for r in _metrics(run) if r["source"] == "attack/analytic@aggregate"]
    assert {r["key"]: r["value"] for r in rows}["num_originals"] == 1.0
    assert summary["attacks"]["analytic@aggregate"]["psnr"] >= 40


def _check_report(out: Path, summary: dict) -> None:
    """The run's report.html in a real browser (skipped without chromium): no console error,
    every image loaded, the attack table showing summary.json's numbers."""
    if chromium_path() is not None:
        assert_report_matches_summary(out)


CHECKS: dict[str, Callable[[Path, dict], None]] = {
    "default": _check_report,
    "secagg_isolation": _check_isolation,
    "cifar10_npz_mlp": _check_analytic_exact,
    "my_images": _check_analytic_exact,
    "all_attacks_cnn6_cifar": _check_cnn6,
    "all_attacks_linear_fedavg": _check_linear_fedavg,
    "inference_attacks_adult": _check_adult_inference,
}
SHARED_DATASETS = ("adult", "utkface", "cifar10_npz", "mnist_idx")


def _examples() -> list[Path]:
    """The example configs of one run, game or measure (a sweep's, with a [sweep] table, is
    planned and checked cell by cell in tests/e2e/test_sweep.py)."""
    return sorted(
        p
        for p in EXPERIMENTS.glob("*.toml")
        if "sweep" not in tomllib.loads(p.read_text(encoding="utf-8"))
    )


def _command(doc: dict) -> str:
    return "game" if "game" in doc else "measure" if "measure" in doc else "run"


def _accuracy_exemption(path: Path) -> str | None:
    """The reason an example gives for not improving accuracy (``# accuracy: ...``), if any."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("# accuracy:"):
            reason = line.split(":", 1)[1].strip()
            assert len(reason) > 20, f"{path.name}: '# accuracy:' needs a reason, got {reason!r}"
            return reason
    return None


def _my_images_folder(target: Path) -> None:
    """Three class folders of real scikit-learn digits as PNGs (what ``my_images.toml`` wants)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in (0, 1, 2):
        folder = target / f"digit_{label}"
        folder.mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.target == label][:16]):
            Image.fromarray((image / 16 * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")


def test_quick_settings_name_existing_examples() -> None:
    names = {p.stem for p in EXPERIMENTS.glob("*.toml")}
    assert set(QUICK) | set(CHECKS) <= names, "QUICK or CHECKS name examples that no longer exist"


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.stem)
def test_example_runs_from_another_folder(
    path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    example_data_root: Callable[[Path], list[str]],
) -> None:
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    if doc.get("data", {}).get("name") in SHARED_DATASETS:
        request.getfixturevalue(
            "shared_data"
        )  # skips, with the reason, where ../shared/data is absent
    config = path
    if path.stem == "my_images":  # the user's own folder: a copy of the example beside real images
        config = tmp_path / "config" / path.name
        config.parent.mkdir()
        shutil.copy(path, config)
        _my_images_folder(config.parent / doc["data"]["root"])
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    command = _command(doc)
    extra = CPU if command == "run" else []
    data = [a for o in example_data_root(path) for a in ("--set", o)]  # $FL_PRIVSIM_SHARED_DATA
    args = [
        command,
        str(config),
        *extra,
        *data,
        *QUICK.get(path.stem, []),
        "--out",
        str(tmp_path / "out"),
    ]
    if command == "run":
        args.append("--quiet")
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert not any(cwd.iterdir()), (
        f"{path.name} wrote into the current folder: {list(cwd.iterdir())}"
    )
    if path.stem in CHECKS:
        CHECKS[path.stem](tmp_path / "out", summary)
    if command != "run":
        return
    if _accuracy_exemption(path) is None:
        assert summary["final_accuracy"] > summary["initial_accuracy"], (
            f"{path.name}: training does not improve test accuracy over round 0 "
            f"({summary['accuracy_by_round']}); fix the example or say why in a '# accuracy:' line"
        )
