"""The threat models: which norms there are, the size of a perturbation in each, the steepest step in each, and the
projection onto a ball intersected with the pixel box (L-infinity's by clamping here; L2's and L1's, exact and longer,
in projection.py).

Units. "Linf": levels out of 255 (the budget is a whole number of levels once on the lattice). "L2" and "L1": the norm
of the perturbation of the whole (3, H, W) image in [0, 1] pixel units, AutoAttack's and RobustBench's convention.

The 8-bit lattice inside an L2 or L1 ball, where an attack's last step lands, is lattice.py's.
"""
from utils.attacks.projection import project_l1, project_l2

NORMS = ("Linf", "L2", "L1")


def check_norm(norm, offered=NORMS, method=None):
    """`norm` if it is one of `offered`, else ValueError naming the norms there are."""
    if norm not in offered:
        who = f"{method} has" if method else "norms are"
        raise ValueError(f"norm {norm!r}: {who} {', '.join(offered)}")
    return norm


def size(difference, norm):
    """Per sample (B,): the norm of `difference` (B, ...) flattened, in the norm's own pixel units (Linf as a [0, 1]
    fraction too: multiply by 255 for levels)."""
    flat = difference.flatten(1)
    if norm == "Linf":
        return flat.abs().amax(dim=1)
    return flat.norm(p=2 if norm == "L2" else 1, dim=1)


def steepest(grad, norm):
    """The unit step of steepest descent for `norm` (to be subtracted): sign(grad) in L-infinity, grad / ||grad||_2
    in L2 (Madry et al. 2018, torchattacks' PGDL2)."""
    if norm == "Linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))


def project(delta, original, epsilon, norm):
    """The projection onto the `norm` ball of radius `epsilon` ([0, 1] units) intersected with the pixel box."""
    if norm == "Linf":
        return delta.clamp(-epsilon, epsilon).add_(original).clamp_(0, 1).sub_(original)
    return (project_l2 if norm == "L2" else project_l1)(delta, original, epsilon)
