"""Our L2 and L1 attacks (and FAB-T in all three norms) against their peers, on a small CNN adversarially trained on
the digits (the model of test_crosscheck_autoattack: on an undefended model every attack fools every image).

The same images, the same epsilon, steps and targets; every result judged the same way, on its 8-bit image (each
attack's returned image rounded to whole levels and classified, and, for ours, the budget checked on those levels).
Ours must fool at least as many images as each run of torchattacks, ART and the reference's l1-APGD (Croce and
Hein's own code, pyautoattack), over two seeds where the peer draws a random start, and at most one image fewer than
the reference's FAB-T:
- PGD-L2 against torchattacks' PGDL2 (same alpha, no random start on either side);
- APGD-CE in L2 against torchattacks' APGD(norm="L2") and ART's Auto-PGD (norm=2);
- APGD-CE in L1 (AutoAttack's L1 settings) against ART's Auto-PGD (norm=1) and the reference l1-APGD (pyautoattack);
- APGD-T in L2 against torchattacks' APGDT(norm="L2");
- FAB-T in L-infinity and L2 against torchattacks' FAB(multi_targeted=True), in L1 against the reference FAB-T
  (pyautoattack's: torchattacks' targeted FAB fails in L1 with an UnboundLocalError);
- Square in L2 against torchattacks' Square(norm="L2"), QUERIES queries each, p_init 0.8 on both sides.
APGD-T and FAB-T use 3 target classes on both sides, 10 steps everywhere, to keep the module near two minutes of CPU
(the two comparisons with the reference are marked slow).
Run with -s to see the counts.
"""
import numpy as np
import pytest
import torch

from step_2_pretrained import load_model, prepare_image, to_tensor
from tests.test_crosscheck_autoattack import trained  # noqa: F401  (the fixture: digits and the robust model)
from utils.attacks import make_attack, perturbation_size
from utils.data import list_photos

torchattacks = pytest.importorskip("torchattacks")
art = pytest.importorskip("art")
pyautoattack = pytest.importorskip("pyautoattack")
from art.attacks.evasion import AutoProjectedGradientDescent  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402
from pyautoattack.autopgd_base import APGDAttack  # noqa: E402
from pyautoattack.fab_pt import FABAttack_PT  # noqa: E402

pytestmark = pytest.mark.crosscheck  # a peer side by side: make test-fast leaves it out

# budgets where the robust model is partly fooled (measured: about 1/3 of the digits at L2 2.0 and L-inf 32 levels,
# 3 or 4 of 30 at L1 12): a broken attack on either side shows
EPSILONS = {"Linf": 32, "L2": 2.0, "L1": 12.0}
STEPS, TARGETS, SEEDS, QUERIES = 10, 3, (0, 1), 300


@pytest.fixture(scope="module")
def digits(trained):  # noqa: F811
    torch.set_num_threads(1)  # conftest.py says why
    model = load_model(str(trained / "robust.pt2"))
    paths, names = list_photos(trained / "digits" / "test")
    images = to_tensor([prepare_image(path, model) for path in paths]).contiguous()
    labels = torch.tensor([int(name.split("/")[0]) for name in names])
    return model, ContiguousGradient(model), images, labels


class _Contiguous(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pixels):
        return pixels.view_as(pixels)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class ContiguousGradient(torch.nn.Module):
    """The model for the peers: they `view` their input gradients, which a channels-last model gives in that layout.
    The model is held outside the module tree, so a peer's .eval() does not reach the exported program."""

    def __init__(self, model):
        super().__init__()
        self.held = [model]

    def forward(self, pixels):
        return self.held[0](_Contiguous.apply(pixels))


def fooled(model, adversarial, labels):
    """How many 8-bit versions of `adversarial` are misclassified."""
    with torch.no_grad():
        on_lattice = torch.as_tensor(adversarial).mul(255).round().clamp(0, 255).div(255)
        return int((model(on_lattice).argmax(dim=1) != labels).sum())


def ours(method, norm, digits, **options):
    model, _, images, labels = digits
    result = make_attack(method, model, norm=norm, epsilon=EPSILONS[norm], steps=STEPS, targeted=False,
                         **options)(images, labels)
    size = perturbation_size(result.adversarial, images, norm)
    assert (size <= EPSILONS[norm] * (1 + 1e-9)).all(), f"{method} {norm}: over budget {size.max()}"
    count = fooled(model, result.adversarial, labels)
    assert count == int(result.success.sum()), "our success is the success of the 8-bit image"
    return count


def art_apgd(peer, images, labels, norm, seed):
    classifier = PyTorchClassifier(peer, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(images.shape[1:]),
                                   nb_classes=10, clip_values=(0, 1))
    np.random.seed(seed)
    attack = AutoProjectedGradientDescent(classifier, norm={"L2": 2, "L1": 1}[norm], eps=EPSILONS[norm],
                                          eps_step=2 * EPSILONS[norm], max_iter=STEPS, targeted=False,
                                          nb_random_init=1, loss_type="cross_entropy", verbose=False)
    return attack.generate(images.numpy(), np.eye(10, dtype=np.float32)[labels.numpy()])


def torchattacks_run(name, norm, peer, images, labels, seed):
    epsilon = EPSILONS[norm] / 255 if norm == "Linf" else EPSILONS[norm]
    if name == "PGDL2":
        attack = torchattacks.PGDL2(peer, eps=epsilon, alpha=2.5 * epsilon / STEPS, steps=STEPS, random_start=False)
    elif name == "APGD":
        attack = torchattacks.APGD(peer, norm=norm, eps=epsilon, steps=STEPS, n_restarts=1, loss="ce", seed=seed)
    elif name == "APGDT":
        attack = torchattacks.APGDT(peer, norm=norm, eps=epsilon, steps=STEPS, n_restarts=1, n_classes=10, seed=seed)
        attack.n_target_classes = TARGETS
    elif name == "Square":
        attack = torchattacks.Square(peer, norm=norm, eps=epsilon, n_queries=QUERIES, n_restarts=1, p_init=0.8,
                                     seed=seed)
    else:
        attack = torchattacks.FAB(peer, norm=norm, eps=epsilon, steps=STEPS, n_restarts=1, multi_targeted=True,
                                  n_classes=10, seed=seed)
        attack.n_target_classes = TARGETS
    return attack(images, labels)


def reference_run(name, peer, images, labels, seed):
    if name == "FAB-T":
        attack = FABAttack_PT(peer, norm="L1", n_iter=STEPS, eps=EPSILONS["L1"], targeted=True,
                              n_target_classes=TARGETS, seed=seed, device="cpu")
    else:
        attack = APGDAttack(peer, norm="L1", n_iter=STEPS, eps=EPSILONS["L1"], n_restarts=1, seed=seed, device="cpu")
        attack.use_largereps = True
    return attack.perturb(images, labels)


# (our method, norm, our options, peer, peer's name)
COMPARISONS = [
    ("pgd", "L2", dict(alpha=2.5 * EPSILONS["L2"] / STEPS), "torchattacks", "PGDL2"),
    ("apgd", "L2", {}, "torchattacks", "APGD"),
    ("apgd", "L2", {}, "art", "APGD"),
    ("apgd", "L1", {}, "art", "APGD"),
    # strict, as against every peer: the same stages, steps and evaluations as the reference's l1-APGD (its growing
    # epsilon, use_largereps), so no image fewer (measured 2026-12-07 before the fix: ours 4 of 30 where the
    # reference fooled 6 and 5, on a CI fixture model; 3 against 4 on this machine's)
    pytest.param("apgd", "L1", {}, "reference", "APGD", marks=pytest.mark.slow),
    ("apgd-t", "L2", dict(target_classes=TARGETS), "torchattacks", "APGDT"),
    ("fab", "Linf", dict(target_classes=TARGETS), "torchattacks", "FAB"),
    ("fab", "L2", dict(target_classes=TARGETS), "torchattacks", "FAB"),
    pytest.param("fab", "L1", dict(target_classes=TARGETS), "reference", "FAB-T", marks=pytest.mark.slow),
    ("square", "L2", dict(queries=QUERIES), "torchattacks", "Square"),
]


@pytest.mark.parametrize("method, norm, options, peer_library, peer_name", COMPARISONS,
                         ids=[f"{c.values[0] if hasattr(c, 'values') else c[0]}-{c.values[1] if hasattr(c, 'values') else c[1]}"
                              f"-vs-{c.values[3] if hasattr(c, 'values') else c[3]}" for c in COMPARISONS])
def test_ours_fools_at_least_as_many_as_the_peer(method, norm, options, peer_library, peer_name, digits):
    model, peer, images, labels = digits
    mine = ours(method, norm, digits, **options)
    theirs = []
    # PGDL2 without a random start and FAB-T with one restart (no random start either) draw nothing: one run
    for seed in (SEEDS[:1] if peer_name in ("PGDL2", "FAB", "FAB-T") else SEEDS):
        if peer_library == "torchattacks":
            adversarial = torchattacks_run(peer_name, norm, peer, images, labels, seed)
        elif peer_library == "art":
            adversarial = art_apgd(peer, images, labels, norm, seed)
        else:
            adversarial = reference_run(peer_name, peer, images, labels, seed)
        theirs.append(fooled(model, adversarial, labels))
    print(f"\n{method} {norm} epsilon {EPSILONS[norm]}, {STEPS} steps: ours fooled {mine}/{len(labels)}, "
          f"{peer_library} {peer_name} {theirs} (seeds {list(SEEDS[:len(theirs)])})")
    assert 0 < mine < len(labels), "the comparison needs a model neither broken nor unbreakable at this budget"
    # the reference's FAB-T (Croce and Hein's own code) within one image, the rule for the reference AutoAttack; the
    # others, the reference's l1-APGD included, at least matched
    slack = 1 if (peer_library, peer_name) == ("reference", "FAB-T") else 0
    if method == "square":  # random search on both sides: ours over the same seeds, in total (as the Linf check)
        runs = [mine] + [ours(method, norm, digits, seed=seed, **options) for seed in SEEDS[1:]]
        print(f"square L2: ours {runs}, torchattacks {theirs}")
        assert sum(runs) >= sum(theirs), (runs, theirs)
        return
    assert all(mine + slack >= count for count in theirs), (mine, theirs)
