"""Step 10's certifiers: proofs that no perturbation within a budget changes a classifier's answer, the lower bound
beside the attacks' upper bound on robust accuracy.

This package owns the verifiers and their report:
- network.py: a model (a .pt2 program's graph, or a Classifier's network exported here) as the affine, ReLU and max
  pool layers a verifier encodes; any other operation is refused in one line naming it.
- bounds.py: the input ball (L-infinity and L1 in [0, 1], on the 8-bit lattice or continuous), and a dense NumPy CROWN
  the tests check the tensor bounds against.
- propagation.py: interval, CROWN (Zhang et al. 2018) and alpha-CROWN bounds on tensors, batched, any device; also the
  bound step 9's certified training differentiates.
- branch.py: branch and bound over ReLU splits with beta-CROWN's bounds (complete, given the time).
- milp.py: the exact mixed-integer program (Tjeng, Xiao and Tedrake 2019), solved by HiGHS (scipy.optimize.milp).
- base.py, bounds_certifier.py, exact.py: the certifiers behind `--method`, registered in CERTIFIERS.
- smoothing.py: randomized smoothing (Cohen et al. 2019), an L2 certificate for any model; smoothing_method.py step
  10's `--method smoothing` (its flags and rows); smoothing_page.py the page's line; report_smoothing.py its certified
  accuracy against the radius.
- run.py: certifying a list of images, certified.csv, the counterexample PNGs, summary.md and the figure.

A new certifier is a subclass of base.Certifier (its name, norms, flags, settings and columns) and one more entry in
CERTIFIERS.

The modules import scipy (sparse matrices, HiGHS, the statistics) inside the functions that use it, not at the top:
it takes about a second to import, and every step 8 run (and the page) imports this package for the names of its
certifiers, with --certify or without.
"""
from utils.certify.base import MISCLASSIFIED, NOT_ROBUST, ROBUST, UNKNOWN, Certifier
from utils.certify.bounds_certifier import BoundsCertifier
from utils.certify.exact import ExactCertifier
from utils.certify.smoothing_method import Smoothing

CERTIFIERS = {certifier.name: certifier for certifier in (ExactCertifier, BoundsCertifier, Smoothing)}

__all__ = ["CERTIFIERS", "Certifier", "ROBUST", "NOT_ROBUST", "UNKNOWN", "MISCLASSIFIED"]
