"""Leakage measures, pure torch (no Flower, no Ray).

- :mod:`~adversaries.measures.i2f`: the Inversion Influence Function (Zhang et al., NeurIPS
  2023): predicted reconstruction error of a perturbed gradient.
- :mod:`~adversaries.measures.sensitivity`: per-layer Jacobian sensitivity ``‖∂g_l/∂x‖_F``
  (Mo et al., arXiv:2105.13929).
- :mod:`~adversaries.measures.subspace`: principal angles between two groups' per-sample
  gradient subspaces, per layer (Mo et al.).
- :mod:`~adversaries.measures.vinfo`: layer-wise empirical V-information (Xu et al., ICLR
  2020; Mo et al.) about a discrete target (label, private attribute).
- :mod:`~adversaries.measures.vinfo_gaussian`: the same about a continuous target (the
  input: Mo et al.'s "original information") with Gaussian-likelihood decoders.

Measures are analyst-side: they see the private inputs and labels, unlike the attacks.
"""

from adversaries.measures._common import layer_groups, per_sample_layer_gradients
from adversaries.measures.i2f import (
    I2FExpectation,
    I2FResult,
    InversionJacobian,
    i2f,
    i2f_expected,
    max_eigenvalue,
    sample_noise,
)
from adversaries.measures.sensitivity import (
    exact_sensitivity,
    jacobian_sensitivity,
    summarize_sensitivity,
)
from adversaries.measures.subspace import (
    group_subspace_distance,
    layer_subspace_distance,
    principal_angles,
)
from adversaries.measures.vinfo import layer_v_information, plot_layer_table, v_information
from adversaries.measures.vinfo_gaussian import (
    GaussianVInfoResult,
    gaussian_v_information,
    layer_gaussian_v_information,
)

__all__ = [
    "GaussianVInfoResult",
    "I2FExpectation",
    "I2FResult",
    "InversionJacobian",
    "exact_sensitivity",
    "gaussian_v_information",
    "group_subspace_distance",
    "i2f",
    "i2f_expected",
    "jacobian_sensitivity",
    "layer_gaussian_v_information",
    "layer_groups",
    "layer_subspace_distance",
    "layer_v_information",
    "max_eigenvalue",
    "per_sample_layer_gradients",
    "plot_layer_table",
    "principal_angles",
    "sample_noise",
    "summarize_sensitivity",
    "v_information",
]
