"""Input-reconstruction (gradient inversion) attacks; importing registers them.

- ``analytic``: closed-form recovery from a fully-connected first layer with bias.
- ``idlg``: iDLG label rule plus L-BFGS gradient matching (Zhao et al. 2020).
- ``inverting_gradients``: cosine matching with a TV prior (Geiping et al. 2020).
"""

from adversaries.reconstruction.analytic import AnalyticAttack
from adversaries.reconstruction.idlg import IDLGAttack
from adversaries.reconstruction.inverting_gradients import InvertingGradientsAttack

__all__ = ["AnalyticAttack", "IDLGAttack", "InvertingGradientsAttack"]
