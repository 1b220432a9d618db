"""Paths that work from anywhere (fl_privsim.core.paths): relative paths in a config file resolve
against the file's folder, those given on the command line against the current directory,
defaults not written in a file stay relative to the current directory; a missing path is
reported absolute, with a path that would work."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_privsim.core import config, paths
from fl_privsim.core.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
#: Where the shipped configs' relative data.root values point (../shared/data beside the repository).
BESIDE = REPO.parent / "shared" / "data"
needs_beside = pytest.mark.skipif(
    not BESIDE.is_dir(),
    reason=f"the shipped configs point at {BESIDE}, "
    "the shared data folder beside the repository, which is absent here",
)


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory: a fresh folder that is neither the repository nor the config's."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _file(folder: Path, text: str, name: str = "c.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


# ------------------------------------------------------------------------- the rule, per command
def test_run_config_file_paths_resolve_against_its_folder(tmp_path: Path, elsewhere: Path) -> None:
    cfg_file = _file(
        tmp_path / "cfgs", '[data]\nname = "folder"\nroot = "imgs"\n[output]\ndir = "../out"\n'
    )
    cfg = config.load(cfg_file)
    assert cfg.data.root == str(tmp_path / "cfgs" / "imgs")
    assert cfg.output.dir == str(tmp_path / "out")
    assert str(tmp_path / "cfgs" / "imgs") in config.to_toml(
        cfg
    )  # what clients and the run folder get


def test_run_set_paths_resolve_against_cwd(tmp_path: Path, elsewhere: Path) -> None:
    cfg_file = _file(tmp_path / "cfgs", '[data]\nname = "folder"\nroot = "imgs"\n')
    cfg = config.load(cfg_file, ['data.root="rel/imgs"', 'output.dir="outs"'])
    assert cfg.data.root == str(elsewhere / "rel" / "imgs")
    assert cfg.output.dir == str(elsewhere / "outs")
    # a relative --config is itself relative to the current directory
    _file(elsewhere, '[data]\nname = "folder"\nroot = "imgs"\n', "here.toml")
    assert config.load("here.toml").data.root == str(elsewhere / "imgs")


def test_defaults_not_in_a_file_stay_relative_to_cwd(tmp_path: Path, elsewhere: Path) -> None:
    assert config.load(_file(tmp_path / "cfgs", 'name = "x"\n')).output.dir == "runs"
    assert config.load(None, ['data.root=""']).data.root == ""  # "" is "not set", never resolved


def test_measure_and_game_follow_the_same_rule(tmp_path: Path, elsewhere: Path) -> None:
    from fl_privsim.app.game import load_game_config
    from fl_privsim.app.measure import load_config

    m_file = _file(tmp_path / "m", '[data]\nroot = "mnist"\n[output]\ndir = "out"\n')
    m = load_config(m_file)
    assert m["data"]["root"] == str(tmp_path / "m" / "mnist") and m["output"]["dir"] == str(
        tmp_path / "m" / "out"
    )
    assert load_config(m_file, ['data.root="x"'])["data"]["root"] == str(elsewhere / "x")
    assert load_config(None)["output"]["dir"] == "runs"

    g_file = _file(tmp_path / "g", 'output_dir = "out"\n[data]\nname = "digits"\nroot = "d"\n')
    g = load_game_config(g_file)
    assert g.data.root == str(tmp_path / "g" / "d") and g.output_dir == str(tmp_path / "g" / "out")
    assert load_game_config(g_file, ['data.root="x"', 'output_dir="o"']).output_dir == str(
        elsewhere / "o"
    )
    assert load_game_config(None).output_dir == "runs"


def test_reproduce_config_is_relative_to_cwd(elsewhere: Path) -> None:
    from fl_privsim.app.reproduce import get
    from fl_privsim.app.reproduce.base import resolve_settings

    _file(elsewhere, "seed = 7\n", "mine.toml")
    assert resolve_settings(get("demixing"), "mine.toml")["seed"] == 7


def test_shared_data_dir_honours_the_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fl_privsim.app.reproduce.base import shared_data_dir as reexported

    monkeypatch.setenv("FL_PRIVSIM_SHARED_DATA", str(tmp_path / "sd"))
    assert paths.shared_data_dir() == tmp_path / "sd" and reexported() == tmp_path / "sd"
    monkeypatch.delenv("FL_PRIVSIM_SHARED_DATA")
    if BESIDE.is_dir():
        assert paths.shared_data_dir() == BESIDE.resolve()


# ------------------------------------------------------------------------- missing-path errors
def test_missing_data_root_shows_absolute_path_and_suggestion(
    tmp_path: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fl_privsim.core.data import load_dataset

    # written in a file as if relative to the current directory: the folder is in the cwd
    (elsewhere / "imgs").mkdir()
    cfg = config.load(_file(tmp_path / "cfgs", '[data]\nname = "folder"\nroot = "imgs"\n'))
    with pytest.raises(DataError) as err:
        load_dataset("folder", root=cfg.data.root)
    msg = str(err.value)
    assert str(tmp_path / "cfgs" / "imgs") in msg and f"did you mean {elsewhere / 'imgs'}?" in msg
    assert "\n" not in msg

    # a folder of that name in the shared data folder, holding the dataset's file
    shared = tmp_path / "sd"
    (shared / "cifar10").mkdir(parents=True)
    (shared / "cifar10" / "cifar10_exact_subset.npz").write_bytes(b"")
    monkeypatch.setenv("FL_PRIVSIM_SHARED_DATA", str(shared))
    with pytest.raises(DataError) as err:
        load_dataset("cifar10_npz", root=tmp_path / "nowhere" / "cifar10")
    assert str(tmp_path / "nowhere" / "cifar10") in str(err.value)
    assert f"did you mean {shared / 'cifar10'}?" in str(err.value)

    # nothing that would work: say what the folder must hold
    with pytest.raises(
        DataError, match=r"does not exist; set data.root to the folder holding t10k-images"
    ):
        load_dataset("mnist_idx", root=tmp_path / "nowhere" / "zzz_no_such")


def test_missing_config_file_suggests_the_repository_one(elsewhere: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config.load("experiments/default.toml")
    msg = str(err.value)
    assert str(elsewhere / "experiments" / "default.toml") in msg
    assert f"did you mean {EXPERIMENTS / 'default.toml'}?" in msg


def test_reproduction_and_game_data_follow_the_shared_data_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fl_privsim.app.game import _adult_root, load_game_config
    from fl_privsim.app.reproduce.base import ReproContext

    monkeypatch.setenv("FL_PRIVSIM_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as err:
        ReproContext(folder=None, device=None, seed=0).data("zzz_data")  # type: ignore[arg-type]
    assert str(tmp_path / "nowhere" / "zzz_data") in str(
        err.value
    ) and "FL_PRIVSIM_SHARED_DATA" in str(err.value)
    with pytest.raises(
        DataError, match=f"data.root is not set and {tmp_path / 'nowhere' / 'adult'} does not"
    ):
        _adult_root("")
    (tmp_path / "sd" / "adult").mkdir(parents=True)
    (tmp_path / "sd" / "adult" / "adult.data.gz").write_bytes(b"")
    monkeypatch.setenv("FL_PRIVSIM_SHARED_DATA", str(tmp_path / "sd"))
    cfg = load_game_config(None, ['data.name="adult"', 'game.kind="attribute"'])
    assert cfg.data.root == str(tmp_path / "sd" / "adult") == str(_adult_root(""))


def test_missing_path_message_without_a_candidate(tmp_path: Path) -> None:
    msg = paths.missing_path_message(
        "data.root", tmp_path / "zzz_none", expect="it must hold x.npz"
    )
    assert msg == f"data.root {tmp_path / 'zzz_none'} does not exist; it must hold x.npz"


# ------------------------------------------------------------------------- the shipped configs
@pytest.mark.shared_data
@needs_beside
@pytest.mark.parametrize(
    "name",
    ["cifar10_npz_mlp", "all_attacks_cnn6_cifar", "malicious_imprint", "inference_attacks_adult"],
)
def test_shipped_run_configs_find_their_data_from_any_folder(name: str, elsewhere: Path) -> None:
    cfg = config.load(EXPERIMENTS / f"{name}.toml")
    assert Path(cfg.data.root).is_absolute() and Path(cfg.data.root).exists(), cfg.data.root
    assert cfg.output.dir == "runs"  # the cwd's runs/, not experiments/runs


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "name, sub", [("game_attribute_adult", "adult"), ("game_attribute_utkface", "utkface")]
)
def test_shipped_game_configs_find_their_data_from_any_folder(
    name: str, sub: str, elsewhere: Path, shared_data: Path
) -> None:
    from fl_privsim.app.game import load_game_config

    if not (shared_data / sub).is_dir():
        pytest.skip(f"{shared_data / sub} is absent")
    cfg = load_game_config(EXPERIMENTS / f"{name}.toml")  # data.root unset: <shared data>/<sub>
    assert Path(cfg.data.root) == shared_data / sub
    assert cfg.output_dir == "runs"


def test_shipped_measure_configs_load_from_any_folder(elsewhere: Path) -> None:
    from fl_privsim.app.measure import load_config

    for name in ("measure_i2f", "measure_vinfo"):  # digits (built in); output in the cwd's runs/
        cfg = load_config(EXPERIMENTS / f"{name}.toml")
        assert cfg["output"]["dir"] == "runs" and cfg["data"]["root"] == ""


@pytest.mark.shared_data
@needs_beside
def test_measure_mnist_root_relative_to_the_config(tmp_path: Path, elsewhere: Path) -> None:
    """A measure config beside the repository's experiments/ naming MNIST as the shipped comment says."""
    from fl_privsim.app.measure import load_config

    text = (EXPERIMENTS / "measure_i2f.toml").read_text()
    assert 'root = "../../shared/data/mnist"' in text  # the comment's alternative
    cfg = load_config(EXPERIMENTS / "measure_i2f.toml", ['data.name="mnist_idx"'])
    assert cfg["data"]["root"] == ""
    root = paths.resolve_value(
        "../../shared/data/mnist", EXPERIMENTS
    )  # as a file in experiments/ would
    assert Path(root).is_dir() and Path(root) == (BESIDE / "mnist").resolve()
