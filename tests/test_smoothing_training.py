"""Step 9's --method noise (Gaussian data augmentation, the base model of randomized smoothing): the noise is seeded
per epoch and batch (a resumed run ends with the same weights), it changes what is learnt, and its flags."""
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_in_process, run_script
from utils.samples import digit_image
from utils.training import load_checkpoint

STEP_9 = "step_9_adversarial_training.py"


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory):
    """An ImageFolder of 6 digits per class (60 images)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    root = tmp_path_factory.mktemp("few_digits")
    for digit in range(10):
        (root / str(digit)).mkdir()
        for index in np.flatnonzero(digits.target == digit)[:6]:
            Image.fromarray(digit_image(digits.images[index])).save(root / str(digit) / f"{index:04d}.png")
    return root


def train(folder, output, *extra, cwd):
    result = run_script(STEP_9, folder, "--output", output, "--batch-size", "16", "--threads", "1", "--val-steps", "1",
                        *extra, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result


def weights(output):
    return load_checkpoint(output.with_suffix(".ckpt"))["model"]


def same(first, second):
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.slow
def test_noise_training_resumes_to_the_same_weights_and_sigma_matters(few_digits, tmp_path):
    whole = tmp_path / "whole.pt2"
    printed = train(few_digits, whole, "--method", "noise", "--sigma", "0.25", "--epochs", "2", cwd=tmp_path).stdout
    assert "(noise, sigma 0.25)" in printed
    resumed = tmp_path / "resumed.pt2"
    train(few_digits, resumed, "--method", "noise", "--sigma", "0.25", "--epochs", "1", cwd=tmp_path)
    again = train(few_digits, resumed, "--method", "noise", "--sigma", "0.25", "--epochs", "2", "--resume",
                  cwd=tmp_path)
    assert "Resuming after epoch 1" in again.stdout
    assert same(weights(whole), weights(resumed))
    other = tmp_path / "other.pt2"
    train(few_digits, other, "--method", "noise", "--sigma", "0.5", "--epochs", "2", cwd=tmp_path)
    assert not same(weights(whole), weights(other)), "the noise, and its sigma, must change the training"


def test_a_checkpoint_resumes_only_with_its_sigma(few_digits, tmp_path):
    output = tmp_path / "model.pt2"
    train(few_digits, output, "--method", "noise", "--sigma", "0.25", "--epochs", "1", cwd=tmp_path)
    result = run_script(STEP_9, few_digits, "--output", output, "--method", "noise", "--sigma", "0.5", "--epochs", "2",
                        "--resume", cwd=tmp_path)
    assert result.returncode == 2 and "made with --sigma 0.25, not 0.5" in result.stderr


@pytest.mark.parametrize("extra, message", [
    (["--method", "noise"], "--method noise needs it"),
    (["--method", "pgd", "--sigma", "0.25"], "--sigma goes with --method noise"),
    (["--method", "noise", "--sigma", "0"], "--sigma must be in (0, 2], got 0"),
    (["--method", "noise", "--sigma", "-1"], "--sigma must be in (0, 2], got -1"),
])
def test_bad_noise_flags_are_one_line(few_digits, tmp_path, extra, message):
    result = run_in_process(STEP_9, few_digits, "--epochs", "1", "--output", tmp_path / "m.pt2", *extra, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert list(tmp_path.iterdir()) == []
