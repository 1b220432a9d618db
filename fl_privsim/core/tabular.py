"""Tabular data: the UCI Adult reader and encoder, shared by the federation and the games.

UCI Adult (Becker & Kohavi 1996; CC BY 4.0): ``adult.data.gz`` (32,561 training rows) and
``adult.test.gz`` (16,281 test rows) in one folder, e.g. ``../shared/data/adult``.

Encoding (:func:`load_adult`): age, education-num, hours-per-week, log1p capital gain and
log1p capital loss, standardised with the training rows' statistics; one-hot workclass,
marital status, occupation, relationship and native country ("?" is its own category;
categories come from the training rows); then the two sensitive attributes as the last two
binary columns: ``sex`` (1 = Female) and ``race`` (1 = not White: Adult's five race values
binarised so that attribute inference flips one column). Label: income > 50K. ``fnlwgt`` and
``education`` (redundant with education-num) are dropped.

:func:`load_adult_raw` lays the rows out as model inputs of shape (1, 1, D) for the
federation (:mod:`fl_privsim.core.data`); ``mlp`` and ``linear`` flatten them.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from fl_privsim.core.errors import ConfigError, DataError

__all__ = [
    "ADULT_CLASS_NAMES",
    "ADULT_COLUMNS",
    "ADULT_FILES",
    "ADULT_SENSITIVE",
    "adult_attribute_column",
    "load_adult",
    "load_adult_raw",
]

ADULT_COLUMNS = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
    "income",
)
ADULT_CATEGORICAL = ("workclass", "marital-status", "occupation", "relationship", "native-country")
#: The binary sensitive attributes, in the order of the last two encoded columns.
ADULT_SENSITIVE: tuple[str, ...] = ("sex", "race")
ADULT_FILES: tuple[str, str] = ("adult.data.gz", "adult.test.gz")
ADULT_CLASS_NAMES: tuple[str, str] = ("<=50K", ">50K")


def adult_attribute_column(num_features: int, attribute: str) -> int:
    """The encoded column of sensitive ``attribute`` (``sex`` or ``race``) among ``num_features``."""
    if attribute not in ADULT_SENSITIVE:
        raise ConfigError(
            f"adult: attribute {attribute!r} is not allowed; allowed: {', '.join(ADULT_SENSITIVE)}"
        )
    return num_features - len(ADULT_SENSITIVE) + ADULT_SENSITIVE.index(attribute)


def _adult_files(root: str | Path | None) -> tuple[Path, Path]:
    if root is None or str(root) == "":
        raise DataError(
            "adult: data.root is not set; set it to the folder holding adult.data.gz and "
            "adult.test.gz (UCI Adult, e.g. ../shared/data/adult)"
        )
    folder = Path(root).expanduser()
    files = tuple(folder / f for f in ADULT_FILES)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"adult: {', '.join(missing)} not found in {folder}; set data.root to the folder "
            "holding adult.data.gz and adult.test.gz (UCI Adult)"
        )
    return files[0], files[1]


def _read_adult(path: Path) -> list[list[str]]:
    rows = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                parts = [p.strip() for p in line.strip().split(",")]
                if len(parts) == len(ADULT_COLUMNS):
                    rows.append(parts)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(
            f"adult: cannot read {path} ({err}); expected a gzipped UCI Adult file"
        ) from None
    if not rows:
        raise DataError(f"adult: no rows of {len(ADULT_COLUMNS)} comma-separated fields in {path}")
    return rows


def load_adult(
    root: str | Path | None, sensitive: str = "sex"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Adult as ``(x_train, y_train, a_train, x_test, y_test, a_test, attr_column)``.

    ``x_*`` are float32 ``[n, D]`` (see the module docstring), ``y_*`` int64 labels, ``a_*``
    the int64 0/1 values of ``sensitive`` and ``attr_column`` its column in ``x``.
    Missing or unreadable files raise one :class:`DataError` naming the folder.
    """
    if sensitive not in ADULT_SENSITIVE:
        raise ConfigError(
            f"data.sensitive: {sensitive!r} is not allowed for adult; allowed: "
            f"{', '.join(ADULT_SENSITIVE)}"
        )
    train_file, test_file = _adult_files(root)
    train, test = _read_adult(train_file), _read_adult(test_file)
    col = {c: i for i, c in enumerate(ADULT_COLUMNS)}
    cats = {c: sorted({r[col[c]] for r in train}) for c in ADULT_CATEGORICAL}

    def encode(rows: list[list[str]]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        try:
            num = np.array(
                [
                    [
                        float(r[col["age"]]),
                        float(r[col["education-num"]]),
                        float(r[col["hours-per-week"]]),
                        np.log1p(float(r[col["capital-gain"]])),
                        np.log1p(float(r[col["capital-loss"]])),
                    ]
                    for r in rows
                ],
                dtype=np.float64,
            )
        except ValueError as err:
            raise DataError(f"adult: a numeric field is not a number ({err})") from None
        blocks = [num]
        for c in ADULT_CATEGORICAL:
            index = {v: i for i, v in enumerate(cats[c])}
            onehot = np.zeros((len(rows), len(cats[c])))
            for i, r in enumerate(rows):
                j = index.get(r[col[c]])
                if j is not None:
                    onehot[i, j] = 1.0
            blocks.append(onehot)
        sens = {
            "sex": np.array([r[col["sex"]] == "Female" for r in rows], dtype=np.float64),
            "race": np.array([r[col["race"]] != "White" for r in rows], dtype=np.float64),
        }
        y = np.array([r[col["income"]].rstrip(".") == ">50K" for r in rows], dtype=np.int64)
        return np.concatenate(blocks + [sens[a][:, None] for a in ADULT_SENSITIVE], axis=1), y, sens

    xtr, ytr, str_ = encode(train)
    xte, yte, ste = encode(test)
    mean, std = xtr[:, :5].mean(0), xtr[:, :5].std(0) + 1e-8
    xtr[:, :5] = (xtr[:, :5] - mean) / std
    xte[:, :5] = (xte[:, :5] - mean) / std
    attr_column = adult_attribute_column(xtr.shape[1], sensitive)
    return (
        xtr.astype(np.float32),
        ytr,
        str_[sensitive].astype(np.int64),
        xte.astype(np.float32),
        yte,
        ste[sensitive].astype(np.int64),
        attr_column,
    )


def load_adult_raw(
    root: str | Path | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Adult for the federation: ``(train_x, train_y, test_x, test_y, class_names)`` with
    inputs as float32 ``(n, 1, 1, D)`` (already standardised: the data layer does not
    normalise them again)."""
    xtr, ytr, _, xte, yte, _, _ = load_adult(root, "sex")
    d = xtr.shape[1]
    return (
        torch.from_numpy(xtr).reshape(-1, 1, 1, d),
        torch.from_numpy(ytr),
        torch.from_numpy(xte).reshape(-1, 1, 1, d),
        torch.from_numpy(yte),
        ADULT_CLASS_NAMES,
    )
