"""Layer localisation reproduction (Mo et al., arXiv:2105.13929): helpers and a quick run."""

from __future__ import annotations

import math

import pytest
import torch

from fl_privsim.app.reproduce.layer_localisation import _Sketch, _updates


def test_sketch_is_linear_and_preserves_norm_on_average():
    gen = torch.Generator().manual_seed(0)
    sk = _Sketch(20000, 512, gen)
    a = torch.randn(20000, generator=gen, dtype=torch.float64)
    b = torch.randn(20000, generator=gen, dtype=torch.float64)
    assert torch.allclose(sk(a + 2 * b), sk(a) + 2 * sk(b), atol=1e-9)
    assert math.isclose(float(sk(a).norm()), float(a.double().norm()), rel_tol=0.1)
    assert int(sk.counts.sum()) == 20000
    small = _Sketch(10, 512, gen)
    assert small.identity and torch.equal(small(a[:10]), a[:10])


def test_updates_batch_mean_majority_and_clipping():
    grads = {"l": torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)}
    norms = torch.tensor([5.0, 1.0, 1.0], dtype=torch.float64)
    attr = torch.tensor([1, 1, 0])
    sk = {"l": _Sketch(2, 8, torch.Generator().manual_seed(0))}
    gen = torch.Generator().manual_seed(1)
    upd, target = _updates(
        grads, norms, attr, sk, batch=1, sigma=0.0, clip=1.0, generator=gen, batches=None
    )
    assert torch.equal(upd["l"], grads["l"]) and torch.equal(target, attr)
    batches = torch.tensor([[0, 1], [1, 2], [0, 2]])
    upd, target = _updates(
        grads, norms, attr, sk, batch=2, sigma=0.0, clip=1.0, generator=gen, batches=batches
    )
    assert torch.allclose(upd["l"][0], torch.tensor([1.5, 2.5], dtype=torch.float64))
    assert int(target[0]) == 1 and int(target[1]) in (0, 1)
    # sigma > 0 clips each sample to norm 1 before the mean; tiny noise leaves that visible
    upd, _ = _updates(
        grads, norms, attr, sk, batch=1, sigma=1e-9, clip=1.0, generator=gen, batches=None
    )
    assert torch.allclose(upd["l"][0], torch.tensor([0.6, 0.8], dtype=torch.float64), atol=1e-6)


def test_quick_reproduction(shared_data, tmp_path):
    from fl_privsim.app.reproduce import run_reproduction

    path, result = run_reproduction("layer_localisation", quick=True, out=tmp_path / "run")
    s = result.summary
    assert s["layers"] == ["body.0", "body.3", "body.6", "head.0", "head.2"]
    assert s["sensitivity_argmax_layer"] in s["layers"] and s["vinfo_argmax_layer"] in s["layers"]
    assert isinstance(s["original_first"], bool) and isinstance(s["latent_in_fc"], bool)
    assert set(s["vinfo_by_config"]) == {"B1_sigma0", "B1_sigma1", "B8_sigma0", "B8_sigma1"}
    assert 0.0 < s["h_attribute"] <= math.log(2) + 0.1
    assert (
        "Mo et al." in result.table
        and (path / "vinfo.png").is_file()
        and (path / "sensitivity.png").is_file()
    )
    # original information as V-information about the input (Gaussian decoders), B = 1 only
    assert s["input_components"] == 4 and 0.0 < s["input_explained_variance"] <= 1.0
    assert set(s["vinfo_input_by_sigma"]) == {"B1_sigma0", "B1_sigma1"}
    assert set(s["vinfo_input_by_sigma"]["B1_sigma0"]) == set(s["layers"])
    assert s["vinfo_input_argmax_layer"] in s["layers"] and isinstance(
        s["original_first_vinfo"], bool
    )
    assert s["vinfo_input_max"] == max(s["vinfo_input_by_sigma"]["B1_sigma0"].values())
    assert (path / "vinfo_input.png").is_file() and "V-info about the input" in result.table


def test_bad_input_settings_name_the_key(shared_data, tmp_path):
    from fl_privsim.app.reproduce import run_reproduction
    from fl_privsim.core.errors import ConfigError

    with pytest.raises(ConfigError, match="input_variance.*per_dim, shared"):
        run_reproduction(
            "layer_localisation",
            quick=True,
            out=tmp_path / "a",
            overrides=['input_variance="full"'],
        )
    with pytest.raises(ConfigError, match="input_components"):
        run_reproduction(
            "layer_localisation", quick=True, out=tmp_path / "b", overrides=["input_components=0"]
        )


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
