"""Branch and bound (utils.certify.branch) against the exact answers: on tiny networks whose every lattice point can
be tried it proves every robust image and never a fooled one; on random MLPs it gives the MILP's verdict wherever
both decide, proves images the bounds alone leave open, and a counterexample it returns fools the model within the
budget."""
import time

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_certify import brute_force_robust, classifier, tiny_cases
from utils.certify import exact
from utils.certify.bounds import make_ball
from utils.certify.branch import branch_and_bound
from utils.certify.network import extract_layers
from utils.certify.propagation import Box, Net, layer_bounds, margin_bounds


def search(model, image, label, norm, epsilon, seconds=30, refine=None):
    """(branch and bound's Outcome, alpha-CROWN's margin bound at the root) for one image."""
    side = image.shape[0]
    net = Net.from_layers(extract_layers(model, (3, side, side)))
    box = Box.from_balls([make_ball(image, norm, epsilon)])
    bounds = layer_bounds(net, box, "crown")

    def fools(pixels):
        levels = np.round(pixels.numpy() * 255).reshape(3, side, side)
        with torch.no_grad():
            return int(model(torch.from_numpy(levels)[None].float() / 255).argmax()) != label

    outcome = branch_and_bound(net, bounds, box, label, fools, time.perf_counter() + seconds, batch_size=64,
                               refine=refine)
    return outcome, float(margin_bounds(net, box, [label], bounds, "alpha-crown").min())


@pytest.mark.parametrize("refine", ["crown", "interval"])
def test_branch_and_bound_proves_every_robust_image_and_no_fooled_one(refine):
    verdicts = []
    for norm, levels, epsilon in (("Linf", 1, 1), ("L1", 2, 2 / 255)):
        for model, image, label in tiny_cases():
            truth = brute_force_robust(model, image, label, norm, levels)
            outcome, _ = search(model, image, label, norm, epsilon, refine=refine)
            assert (outcome.verdict == "robust") == truth, (norm, outcome)
            if outcome.verdict == "not robust":
                change = np.round(outcome.candidate * 255) - image.transpose(2, 0, 1).reshape(-1)
                assert np.abs(change).max() <= levels
            verdicts.append(outcome.verdict)
    assert {"robust", "not robust"} <= set(verdicts), verdicts


def random_mlp(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 4))
    return classifier(net, 4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_branch_and_bound_gives_the_milps_verdict_and_closes_what_the_bounds_leave(monkeypatch):
    rng = np.random.default_rng(0)
    branched = 0
    monkeypatch.setattr(exact, "BRANCH_SHARE", 0.0)  # the certifier's pipeline without branch and bound
    for seed in range(12):
        model, image = random_mlp(seed), rng.integers(1, 255, (4, 4, 3)).astype(np.uint8)
        with torch.no_grad():
            label = int(model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255).argmax())
        outcome, root = search(model, image, label, "Linf", 6)
        milp = exact.ExactCertifier(model, exact.ExactSettings("Linf", True, 60.0, 0), image_shape=(3, 4, 4)).certify(
            image, label, [6])[0]
        assert milp["verdict"] in ("robust", "not robust")
        assert outcome.verdict in (milp["verdict"], "unknown"), (seed, outcome, milp["verdict"])
        assert outcome.verdict == "robust" or milp["verdict"] == "not robust", (seed, outcome)
        branched += int(root <= 0 and outcome.verdict == "robust" and outcome.domains > 1)
    assert branched > 0, "no image needed a split: branch and bound's splitting was not tested"


def certify_the_split_case():
    """The exact certifier's row for a case the bounds leave open and branch and bound closes (seed 11 at 6 levels)."""
    model, image = random_mlp(11), np.random.default_rng(0).integers(1, 255, (12, 4, 4, 3)).astype(np.uint8)[11]
    with torch.no_grad():
        label = int(model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255).argmax())
    return exact.ExactCertifier(model, exact.ExactSettings("Linf", True, 60.0, 0), image_shape=(3, 4, 4)).certify(
        image, label, [6])[0]


def test_the_exact_certifier_decides_by_branch_and_bound_before_the_milp():
    row = certify_the_split_case()
    assert row["verdict"] == "robust" and row["found_by"] == "bab" and row["domains"] > 1, row


def test_a_program_too_large_for_the_milp_leaves_the_whole_time_to_branch_and_bound(monkeypatch):
    """Above MILP_MAX_BINARIES the program is built (its size is reported) but never solved, and branch and bound
    runs to the time limit instead of stopping at its share: with its share at zero it still decides."""
    def no_solve(*args, **kwargs):
        raise AssertionError("the MILP ran on a program above the size rule")

    monkeypatch.setattr(exact, "BRANCH_SHARE", 0.0)
    monkeypatch.setattr(exact, "MILP_MAX_BINARIES", 0)
    monkeypatch.setattr("utils.certify.milp.MarginProgram.solve", no_solve)
    row = certify_the_split_case()
    assert row["verdict"] == "robust" and row["found_by"] == "bab" and row["domains"] > 1, row
