"""Step 9 and the digits: the ImageFolder the digits writer makes, training that resumes after a kill with the same
bytes, the exported .pt2 read back from disk, and bad input."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from utils.models import Classifier, Preprocessing
from tests.conftest import REPO, run_in_process, run_main, run_script, run_tool
from tools import compare_models
from utils.samples import DIGIT_SIZE, digit_image, digit_split
from utils.models import classes_path, load_program
from utils.training import SMALL_CNN, build_net, load_checkpoint
from utils.files import temp_beside

STEP_9 = "step_9_adversarial_training.py"


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    return load_digits()


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory, digits):
    """An ImageFolder of 6 digits per class (60 images), written as the digits writer writes them."""
    root = tmp_path_factory.mktemp("few_digits")
    for digit in range(10):
        for index in np.flatnonzero(digits.target == digit)[:6]:
            (root / str(digit)).mkdir(exist_ok=True)
            Image.fromarray(digit_image(digits.images[index])).save(root / str(digit) / f"{index:04d}.png")
    return root


def test_digit_images_are_grey_rgb_with_ink_at_full_scale(digits):
    image = digit_image(digits.images[0])
    assert image.shape == (DIGIT_SIZE, DIGIT_SIZE, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert (digit_image(np.full((8, 8), 16.0)) == 255).all()  # 16 (full ink) is white at full scale
    assert (digit_image(np.zeros((8, 8))) == 0).all()


def test_digit_split_is_fixed_disjoint_and_stratified(digits):
    first, again = digit_split(digits.target), digit_split(digits.target)
    assert first == again
    assert not set(first["train"]) & set(first["test"])
    assert len(first["train"]) + len(first["test"]) == len(digits.target)
    test_share = np.bincount(digits.target[first["test"]]) / np.bincount(digits.target)
    assert np.allclose(test_share, 0.25, atol=0.02)


def test_digits_writer_writes_an_image_folder(tmp_path):
    result = run_tool("tools.sample_images", "--digits", tmp_path / "digits", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    train, test = sorted((tmp_path / "digits/train").rglob("*.png")), sorted((tmp_path / "digits/test").rglob("*.png"))
    assert (len(train), len(test)) == (1347, 450)
    assert sorted(path.name for path in (tmp_path / "digits/test").iterdir()) == [str(d) for d in range(10)]
    assert np.asarray(Image.open(test[0])).shape == (DIGIT_SIZE, DIGIT_SIZE, 3)


def train_args(folder, output, *extra):
    return [folder, "--output", output, "--epochs", "3", "--batch-size", "16", "--steps", "2", "--epsilon", "16",
            "--threads", "1", "--val-steps", "2", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("method", [[], ["--method", "crown-ibp", "--epsilon", "4"]], ids=["pgd", "crown-ibp"])
def test_resume_after_sigkill_gives_the_same_model(few_digits, tmp_path, method):
    """Kill a run once its first checkpoint exists, resume it, and get the very model of an uninterrupted run."""
    whole = run_script(STEP_9, *train_args(few_digits, tmp_path / "whole.pt2", *method), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    killed = tmp_path / "killed.pt2"
    process = subprocess.Popen([sys.executable, str(REPO / STEP_9), *map(str, train_args(few_digits, killed, *method))],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed.with_suffix(".ckpt")
    while not checkpoint.exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not killed.exists(), "the run finished before the kill: nothing was resumed"
    assert load_checkpoint(checkpoint)["epoch"] < 3
    killed_writes = [temp_beside(path) for path in (checkpoint, killed, classes_path(killed))]
    resumed = run_script(STEP_9, *train_args(few_digits, killed, "--resume", *method), cwd=tmp_path)
    assert not any(path.exists() for path in killed_writes), "the temp files of killed writes of the outputs go"
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming after epoch" in resumed.stdout
    states = [load_checkpoint(path.with_suffix(".ckpt"))["model"] for path in (tmp_path / "whole.pt2", killed)]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    images = torch.rand(5, 3, 32, 32)
    assert torch.equal(load_program(tmp_path / "whole.pt2")(images), load_program(killed)(images))


@pytest.mark.smoke
def test_exported_program_is_the_trained_model(few_digits, tmp_path):
    """The .pt2 read back gives the checkpoint's model's logits at batch 1 and 16, an input gradient, and its classes
    file names the ImageFolder's classes."""
    output = tmp_path / "plain.pt2"
    result = run_script(STEP_9, *train_args(few_digits, output, "--method", "none", "--epochs", "1"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "training images/s" in result.stdout and "held-out clean" in result.stdout
    assert classes_path(output).read_text().split() == [str(d) for d in range(10)]
    state = load_checkpoint(output.with_suffix(".ckpt"))["model"]
    model = Classifier(build_net(SMALL_CNN, 10), Preprocessing(32, (0.0,) * 3, (1.0,) * 3), memory_format=torch.contiguous_format)
    model.load_state_dict(state)
    model.eval()
    program = load_program(output)
    for batch in (1, 16):
        images = torch.randint(0, 256, (batch, 3, 32, 32)).float().div(255).requires_grad_(True)
        logits = program(images)
        assert logits.shape == (batch, 10)
        assert torch.allclose(logits, model(images), atol=1e-5)
        logits.sum().backward()
        assert images.grad.abs().sum() > 0


@pytest.mark.parametrize("extra, message", [
    (["--output", "model.pt"], "NAME.pt2"),
    (["--arch", "no-such-net"], "unknown architecture"),
    (["--method", "ibp", "--norm", "L2", "--epsilon", "1"], "trains against L-infinity bounds"),
])
def test_bad_arguments_are_one_line(few_digits, tmp_path, extra, message):
    result = run_in_process(STEP_9, few_digits, "--epochs", "1", *extra, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_flat_folder_without_labels_is_refused(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    result = run_script(STEP_9, tmp_path, "--output", tmp_path / "out" / "m.pt2", cwd=tmp_path)
    assert result.returncode == 2 and "needs labels" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(few_digits, tmp_path):
    output = tmp_path / "m.pt2"
    assert run_script(STEP_9, *train_args(few_digits, output, "--method", "none", "--epochs", "1"), cwd=tmp_path).returncode == 0
    result = run_script(STEP_9, *train_args(few_digits, output, "--method", "none", "--epochs", "1", "--resume",
                                            "--epsilon", "8"), cwd=tmp_path)
    assert result.returncode == 2 and "--epsilon" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def write_accuracy(folder, clean, robust, norm="Linf"):
    """A robust_accuracy.csv as step 8 writes it: per epsilon, the ensemble's cumulative rows then the worst case."""
    folder.mkdir()
    lines = ["norm,epsilon,attack,images,clean_accuracy,robust_accuracy"]
    for epsilon, (after_apgd, worst) in robust.items():
        lines += [f"{norm},{epsilon},apgd,20,{clean},{after_apgd}", f"{norm},{epsilon},square,20,{clean},{worst}",
                  f"{norm},{epsilon},worst-case,20,{clean},{worst}"]
    (folder / "robust_accuracy.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_compare_models_tabulates_each_run_and_draws_the_figure(tmp_path):
    write_accuracy(tmp_path / "a", 0.95, {8: (0.4, 0.35), 32: (0.05, 0.0)})
    write_accuracy(tmp_path / "b", 0.9, {8: (0.85, 0.8), 32: (0.6, 0.55)})
    result = run_tool("tools.compare_models", tmp_path / "a", tmp_path / "b", "--names", "plain,robust",
                        "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "| plain | 32 | 95.0% | 5.0% | 0.0% | 0.0% |" in table
    assert "| robust | 8 | 90.0% | 85.0% | 80.0% | 80.0% |" in table
    assert Image.open(tmp_path / "out" / "robust_vs_epsilon.png").size[0] > 300
    assert "epsilon in levels out of 255, L-infinity" in table


@pytest.mark.smoke
def test_compare_models_names_the_norm_and_refuses_mixed_norms(tmp_path):
    write_accuracy(tmp_path / "a", 0.95, {2: (0.4, 0.35)}, norm="L2")
    write_accuracy(tmp_path / "b", 0.9, {2: (0.85, 0.8)}, norm="L2")
    write_accuracy(tmp_path / "c", 0.9, {8: (0.85, 0.8)})
    result = run_tool("tools.compare_models", tmp_path / "a", tmp_path / "b", "--names", "plain,robust",
                      "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epsilon the L2 norm of the whole perturbation in [0, 1] pixel units" in \
        (tmp_path / "out" / "comparison.md").read_text()
    mixed = run_main(compare_models, tmp_path / "a", tmp_path / "c", "--names", "plain,robust",
                     "--output-dir", tmp_path / "mixed")  # in process: one fresh process per program is enough here
    assert mixed.returncode == 2 and "different norms" in mixed.stderr and not (tmp_path / "mixed").exists()
    assert len(mixed.stderr.strip().splitlines()) == 1


def test_compare_models_refuses_a_folder_without_results(tmp_path):
    result = run_tool("tools.compare_models", tmp_path, "--names", "x", "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2 and "robust_accuracy.csv" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_training_data_and_export_name_their_parameters_not_flags(tmp_path):
    """Called from Python they name the parameter; step 9 and tools/export_model write the flag (utils.cli.run)."""
    from utils.cli import UsageError
    from utils.models.export import export_program
    from utils.training_data import split
    with pytest.raises(UsageError, match=r"^val_fraction 0.9 leaves no training image out of 2$"):
        split(2, 0.9, 0)
    with pytest.raises(UsageError, match=r"^the model has no fixed input size: pass input_size N$"):
        export_program(torch.nn.Linear(1, 1), tmp_path / "model.pt2", ["a"], None)
