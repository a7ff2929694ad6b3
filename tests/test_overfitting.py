"""Step 9's catastrophic-overfitting guard (Wong et al. 2020): the rule on made-up histories, and the run that
reproduces it on the digits (FGSM with a random start at epsilon 64, step 128), whose written model is the best
held-out PGD epoch's."""
import numpy as np
import pytest
import torch

from utils.models import Classifier, Preprocessing
from tests.conftest import run_script, run_tool
from utils.models import load_program
from utils.training import (SMALL_CNN, best_epoch, build_net, catastrophic_overfitting, load_checkpoint,
                            watched_for_overfitting)


def epochs(*pairs):
    return [{"epoch": k, "robust": robust, "fgsm": fgsm} for k, (robust, fgsm) in enumerate(pairs, 1)]


def test_the_rule_needs_both_the_collapse_and_fgsm_staying_high():
    assert catastrophic_overfitting(epochs((0.40, 0.50), (0.45, 0.55), (0.05, 0.70)))
    assert not catastrophic_overfitting(epochs((0.40, 0.50), (0.45, 0.55), (0.30, 0.60)))  # a dip, not a collapse
    assert not catastrophic_overfitting(epochs((0.40, 0.50), (0.05, 0.10)))  # both fell: a broken model, not masking
    assert not catastrophic_overfitting(epochs((0.40, 0.50)))                 # nothing to compare with
    assert best_epoch(epochs((0.40, 0.5), (0.45, 0.5), (0.45, 0.6), (0.0, 0.9))) == 2


def test_only_fast_adversarial_training_is_watched():
    # plain (and noise) training has next to no PGD accuracy from the start: its first epoch's 18% against a later 9%,
    # with FGSM's 30%, fits the rule, and the guard wrote an untrained epoch-1 model (70% clean on the digits demo)
    plain = epochs((0.185, 0.35), (0.089, 0.185), (0.126, 0.33), (0.089, 0.30))
    assert catastrophic_overfitting(plain)
    assert watched_for_overfitting("fgsm-rs") and not any(watched_for_overfitting(m) for m in ("none", "noise", "pgd"))


@pytest.mark.slow
def test_fgsm_rs_at_epsilon_64_is_caught_and_the_best_epoch_written(tmp_path):
    assert run_tool("tools.sample_images", "--digits", tmp_path / "digits", cwd=tmp_path).returncode == 0
    output = tmp_path / "fast.pt2"
    result = run_script("step_9_adversarial_training.py", tmp_path / "digits/train", "--method", "fgsm-rs",
                        "--epsilon", "64", "--alpha", "128", "--epochs", "4", "--threads", "1", "--output", output,
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if "catastrophic overfitting (Wong" in line]
    assert len(said) == 1 and said[0].startswith("epoch 4:"), result.stdout
    state = load_checkpoint(output.with_suffix(".ckpt"))
    assert state["best"]["epoch"] == best_epoch(state["history"]) < 4
    program = load_program(output)
    pixels = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def logits(weights):
        model = Classifier(build_net(SMALL_CNN, 10), Preprocessing(32, (0.0,) * 3, (1.0,) * 3),
                           memory_format=torch.contiguous_format)
        model.load_state_dict(weights)
        with torch.no_grad():
            return model.eval()(pixels).numpy()
    with torch.no_grad():
        written = program(pixels).numpy()
    assert np.allclose(written, logits(state["best"]["model"]), atol=1e-5)
    assert not np.allclose(written, logits(state["model"]), atol=1e-3)
