"""The ``secure_aggregation`` reproduction: its cells are valid federations (checked before
launch, without starting Ray: the federations themselves run in tests/e2e/test_secagg_malicious.py
and test_examples.py), and the upload size comes from Flower's own masking code."""

from __future__ import annotations

import logging

import pytest
import torch

from fl_privsim.app.reproduce.secure_aggregation import DEFAULTS, _overrides, masked_upload_bytes
from fl_privsim.app.simulation import validate_before_launch
from fl_privsim.core import config as config_mod


def test_masked_vector_is_8_bytes_an_entry_plus_headers():
    small, large = masked_upload_bytes(1000), masked_upload_bytes(101000)
    assert (large - small) == 8 * 100000  # int64 entries after quantisation and masking
    assert masked_upload_bytes(1000, 4) > small  # one header per array


@pytest.mark.shared_data
@pytest.mark.parametrize("kind", ["isolation", "honest_b1", "imprint", "loki", "honest"])
def test_every_cell_is_a_valid_secagg_federation(kind, shared_data, tmp_path):
    class Ctx:  # the ReproContext fields _overrides reads
        seed, device, log = 0, torch.device("cpu"), logging.getLogger("test")

        @staticmethod
        def data(relative):
            return shared_data / relative

    for n in DEFAULTS["clients"]:
        cfg = config_mod.load(None, _overrides(Ctx, n, DEFAULTS, kind))
        validate_before_launch(cfg)
        assert (
            cfg.federation.secure_aggregation.mode == "secagg+"
            and cfg.federation.clients_per_round == n
        )
        assert cfg.server.role == (
            "malicious" if kind in ("isolation", "imprint", "loki") else "honest_but_curious"
        )
