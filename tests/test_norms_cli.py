"""--norm Linf|L2|L1 on the command line: steps 5, 7, 8 and 9 judged on the files they write and read back, the
budget's range per norm, the RobustBench default, and bad input (one line, exit 2, nothing written)."""
import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import step_5_perturb
import step_9_adversarial_training
from tests.conftest import run_in_process, run_main, run_script
from utils.attacks import perturbation_size
from utils.cli import UsageError
from utils.flags import resolve_threat
from utils.images import to_tensor
from utils.models import load_model, prepare_image
from utils.samples import digit_image
from utils.threat import check_epsilon, check_methods, check_norm, largest_distance, resolve, zoo_threat
from utils.training import load_checkpoint

STEP_5, STEP_7, STEP_8, STEP_9 = ("step_5_perturb.py", "step_7_break_defense.py", "step_8_evaluate.py",
                                  "step_9_adversarial_training.py")
BUDGETS = {"Linf": "16", "L2": "1.5", "L1": "12"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """An ImageFolder of 6 digits per class, as the digits writer writes them."""
    from sklearn.datasets import load_digits
    data = load_digits()
    root = tmp_path_factory.mktemp("norm_digits") / "digits"
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True)
        for index in np.flatnonzero(data.target == digit)[:6]:
            Image.fromarray(digit_image(data.images[index])).save(root / str(digit) / f"{index:04d}.png")
    return root


@pytest.fixture(scope="module")
def digit_model(digits, tmp_path_factory):
    """A small CNN trained plainly for a few epochs on those digits (step 9), as a .pt2 file every step loads."""
    folder = tmp_path_factory.mktemp("norm_model")
    output = folder / "plain.pt2"
    result = run_main(step_9_adversarial_training, digits, "--method", "none", "--epochs", "6", "--val-fraction", "0",
                      "--threads", "1", "--output", output)  # in process: step 9's fresh-process run is in test_training
    assert result.returncode == 0, result.stderr
    return output


def one_per_class(digits, tmp_path):
    """A labelled folder of the first digit of each class (10 images)."""
    root = tmp_path / "ten"
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True)
        first = sorted((digits / str(digit)).iterdir())[0]
        (root / str(digit) / first.name).write_bytes(first.read_bytes())
    return root


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_step5_png_read_back_is_within_epsilon_in_its_norm(norm, digits, digit_model, tmp_path):
    """Step 5's command line in process (its fresh-process run is tests/test_attacks.py's smoke test)."""
    folder = digits / "3"
    out = tmp_path / "out"
    result = run_main(step_5_perturb, folder, "--model", digit_model, "--untargeted", "--method", "apgd", "--norm", norm,
                      "--epsilon", BUDGETS[norm], "--steps", "10", "--output-dir", out)
    assert result.returncode in (0, 1), result.stderr
    model = load_model(str(digit_model), "cpu")
    sizes = []
    for path in sorted(folder.iterdir()):
        original = to_tensor([prepare_image(path, model)])
        back = to_tensor([prepare_image(out / path.name, model)])  # the file, read back
        sizes.append(perturbation_size(back, original, norm).item())
    assert max(sizes) <= float(BUDGETS[norm]) + 1e-9, sizes
    assert max(sizes) > 0.5 * float(BUDGETS[norm]), "the attack spends its budget"
    shown = "L-inf" if norm == "Linf" else norm
    assert all(f" {shown} " in line for line in result.stdout.splitlines() if " -> " in line)
    if norm != "Linf":
        assert f"of {float(BUDGETS[norm]):g})" in result.stdout, "the line gives the size in the norm beside its budget"


def test_step5_one_photo_line_in_l1(digits, digit_model, tmp_path):
    photo = sorted((digits / "7").iterdir())[0]
    result = run_script(STEP_5, photo, "--model", digit_model, "--untargeted", "--method", "fab", "--norm", "L1",
                        "--epsilon", "30", "--steps", "20", "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("Steps used"))
    assert line.endswith(" of 30") and " / L1: " in line
    written = float(line.split(" / L1: ")[1].split(" of ")[0])
    model = load_model(str(digit_model), "cpu")
    back = to_tensor([prepare_image(tmp_path / "out" / "adversarial.png", model)])
    assert perturbation_size(back, to_tensor([prepare_image(photo, model)]), "L1").item() == \
        pytest.approx(written, abs=1e-3)


BAD = {
    "unknown norm": (STEP_5, ["--norm", "L3", "--epsilon", "1"], "unknown norm 'L3'"),
    "L2 over the largest distance": (STEP_5, ["--method", "pgd", "--norm", "L2", "--epsilon", "56"],
                                     "largest L2 distance of a 3x32x32 image"),
    "L1 over the largest distance": (STEP_5, ["--method", "apgd", "--norm", "L1", "--epsilon", "3073"],
                                     "largest L1 distance"),
    "negative": (STEP_5, ["--norm", "L2", "--epsilon", "-1"], "--epsilon must be a positive number"),
    "not a number": (STEP_5, ["--norm", "L2", "--epsilon", "half"], "--epsilon must be a number"),
    "Linf over 255": (STEP_5, ["--epsilon", "256"], "(0, 255]"),
    "method without the norm": (STEP_5, ["--method", "sgd", "--norm", "L2", "--epsilon", "1"],
                                "sgd has no L2 version: it has Linf"),
    "square in L1": (STEP_5, ["--method", "square", "--norm", "L1", "--epsilon", "1"], "square has no L1 version"),
    "L2 without epsilon": (STEP_5, ["--method", "pgd", "--norm", "L2"], "--norm L2 needs --epsilon"),
    "step 7 method without the norm": (STEP_7, ["--method", "mifgsm", "--norm", "L1", "--epsilon", "3"],
                                       "mifgsm has no L1 version"),
    "step 8 grid without the norm": (STEP_8, ["--norm", "L1", "--methods", "pgd", "--epsilons", "3"],
                                     "--methods: pgd has no L1 version"),
    "step 8 ensemble without the norm": (STEP_8, ["--norm", "L1", "--ensemble", "apgd,square", "--epsilons", "1"],
                                         "--ensemble: square has no L1 version"),
    "step 8 L2 over the largest distance": (STEP_8, ["--norm", "L2", "--epsilons", "1,60"], "largest L2 distance"),
    "step 9 L1": (STEP_9, ["--norm", "L1", "--epsilon", "3"], "PGD, has no L1 version"),
    "step 9 L2 over the largest distance": (STEP_9, ["--norm", "L2", "--epsilon", "60"], "largest L2 distance"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_norm_input_is_one_line_exit_2_and_writes_nothing(name, digits, digit_model, tmp_path):
    script, extra, message = BAD[name]
    out = tmp_path / "out"
    photo = sorted((digits / "1").iterdir())[0]
    where = {STEP_5: [photo, "--output-dir", out], STEP_7: [photo, "--output-dir", out],
             STEP_8: [digits, "--output-dir", out], STEP_9: [digits, "--output", out / "model.pt2"]}[script]
    model = [] if script == STEP_9 else ["--model", digit_model]
    result = run_in_process(script, *where, *model, *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert not out.exists() and not (tmp_path / "outputs").exists()


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_step8_in_l2_names_the_norm_writes_fab_distances_and_refuses_another_norm_on_resume(digits, digit_model,
                                                                                             tmp_path):
    folder, out = one_per_class(digits, tmp_path), tmp_path / "eval"
    # Square's 5,000 default queries on every digit still standing were most of this test's time: 300 show the same
    common = (folder, "--model", digit_model, "--steps", "5", "--queries", "300", "--threads", "1", "--output-dir", out)
    result = run_script(STEP_8, *common, "--norm", "L2", "--epsilons", "0.5,1.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_csv(out / "results.csv")
    assert list(rows[0])[-1] == "file" and {"norm", "size", "distance"} <= set(rows[0])
    assert {row["norm"] for row in rows} == {"L2"}
    ran = {row["method"] for row in rows if row["attack"] == "ensemble"}
    assert "apgd" in ran and ran <= {"apgd", "apgd-t", "fab", "square"}, "AutoAttack's standard ensemble in L2"
    model = load_model(str(digit_model), "cpu")
    for row in rows:
        original = to_tensor([prepare_image(folder / row["image"], model)])
        back = to_tensor([prepare_image(out / row["file"], model)])
        assert float(row["size"]) == pytest.approx(perturbation_size(back, original, "L2").item(), abs=1e-4)
        assert float(row["size"]) <= float(row["epsilon"]) + 1e-9
        assert (row["distance"] != "") == (row["method"] == "fab")
        if row["method"] == "fab" and row["success"] == "1":
            assert float(row["distance"]) == pytest.approx(float(row["size"]), abs=1e-3), \
                "FAB's distance is the size of the PNG it wrote"
    fab = [row for row in rows if row["method"] == "fab"]
    assert fab and all(row["distance"] == "inf" or float(row["distance"]) > 0 for row in fab)
    accuracy = read_csv(out / "robust_accuracy.csv")
    assert {row["norm"] for row in accuracy} == {"L2"}
    summary = (out / "summary.md").read_text()
    assert "Threat model L2" in summary and "[0, 1] pixel units" in summary
    assert (out / "robust_vs_distance.png").is_file()
    before = (out / "results.csv").read_bytes()
    again = run_in_process(STEP_8, *common, "--norm", "L1", "--epsilons", "8", "--resume", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.endswith(
        "holds L2 results, not L1; resume with --norm L2 or use another --output-dir\n"), again.stderr
    assert (out / "results.csv").read_bytes() == before, "a refused resume leaves the results as they were"


def test_robustbench_names_bring_their_threat_model():
    assert zoo_threat("robustbench:cifar10/L2/Rice2020Overfitting") == ("L2", 0.5)
    assert zoo_threat("robustbench:cifar10/Linf/Carmon2019Unlabeled") == ("Linf", 8.0)
    assert zoo_threat("robustbench:imagenet/Linf/Salman2020Do_R18") == ("Linf", 4.0)
    assert zoo_threat("robustbench:cifar10/corruptions/Hendrycks2020AugMix") is None
    assert zoo_threat("resnet18") is None
    norm, epsilons, note = resolve("robustbench:cifar10/L2/Rice2020Overfitting", None, None, [10.0])
    assert (norm, epsilons) == ("L2", [0.5]) and "using --norm L2 --epsilon 0.5" in note
    assert resolve("robustbench:cifar10/L2/X", None, [0.25], [10.0])[:2] == ("L2", [0.25]), "a given epsilon wins"
    assert resolve("robustbench:cifar10/L2/X", "Linf", None, [10.0])[:2] == ("Linf", [10.0]), "a given norm wins"
    assert resolve("resnet18", None, None, [10.0]) == ("Linf", [10.0], None), "other models: as before"


def test_the_default_is_said_in_one_line(capsys):
    assert resolve_threat("robustbench:cifar10/L2/Rice2020Overfitting", None, None, 10.0) == ("L2", 0.5)
    assert capsys.readouterr().out.count("\n") == 1


def test_budget_ranges_per_norm():
    assert largest_distance("L2", (3, 32, 32)) == pytest.approx(np.sqrt(3072))
    assert check_epsilon(55.4, "L2", (3, 32, 32)) == 55.4
    for epsilon, norm in ((56, "L2"), (3073, "L1"), (256, "Linf"), (0, "L2"), (-1, "L1")):
        with pytest.raises(UsageError):
            check_epsilon(epsilon, norm, (3, 32, 32))


def test_the_threat_checks_name_the_parameter_not_a_flag():
    """Called from Python they name the parameter; the command line writes the flag (test_bad_norm_input_...)."""
    with pytest.raises(UsageError, match=r"^norm 'L3': choose from Linf, L2, L1$"):
        check_norm("L3")
    with pytest.raises(UsageError, match=r"^epsilon must be in \(0, 255\], got 256 "):
        check_epsilon(256, "Linf")
    with pytest.raises(UsageError, match=r"^method square has no L1 version"):
        check_methods(["square"], "L1")


def test_step9_trains_in_l2_and_resume_refuses_another_norm(digits, tmp_path):
    output = tmp_path / "l2.pt2"
    base = (digits, "--norm", "L2", "--epsilon", "1.0", "--epochs", "1", "--batch-size", "30", "--val-steps", "2",
            "--threads", "1", "--output", output)
    result = run_script(STEP_9, *base, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epsilon L2 1)" in result.stdout and "PGD-2 at L2 1 " in result.stdout
    assert load_checkpoint(output.with_suffix(".ckpt"))["settings"]["norm"] == "L2"
    assert output.is_file()
    other = run_script(STEP_9, digits, "--epsilon", "1.0", "--epochs", "1", "--batch-size", "30", "--val-steps", "2",
                       "--threads", "1", "--output", output, "--resume", cwd=tmp_path)
    assert other.returncode == 2 and "made with --norm L2, not Linf" in other.stderr, other.stderr


def test_the_page_takes_a_norm_and_judges_its_png_in_it(offline_model):
    gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -r requirements.txt)")
    import app
    from tests.conftest import GRACE_HOPPER, OFFLINE
    page = app.on_page(app.trick)(str(GRACE_HOPPER), None, "goldfish", 3, 5, "pgd", "jpeg", OFFLINE, None, None, "L2")
    _, verdict, _, png, *_ = next(page)
    original = to_tensor([prepare_image(GRACE_HOPPER, offline_model)])
    size = perturbation_size(to_tensor([prepare_image(png, offline_model)]), original, "L2").item()
    assert 0 < size <= 3 and f"L2 size {size:.3f} of 3 ([0, 1] pixel units)" in verdict
    with pytest.raises(StopIteration):  # the answer's folder goes once Gradio asks for more
        next(page)
    for epsilon, norm, method, message in ((400, "L2", "pgd", "largest L2 distance of a 3x224x224 image"),
                                           (2, "L1", "pgd", "method pgd has no L1 version"),
                                           (300, "Linf", "pgd", "epsilon must be in (0, 255], got 300")):
        with pytest.raises(gr.Error, match=re.escape(message)):
            next(app.on_page(app.trick)(str(GRACE_HOPPER), None, "goldfish", epsilon, 5, method, "jpeg", OFFLINE,
                                        None, None, norm))
    assert list(Path(app.WORK.name).iterdir()) == []


def test_ensemble_stages_get_autoattacks_settings_per_norm():
    from utils.evaluation.engine import attack_options
    from utils.evaluation.plan import Job, Plan, Settings, standard_ensemble
    assert standard_ensemble("Linf") == ["apgd", "apgd-t", "fab", "square"]
    assert standard_ensemble("L2") == ["apgd", "apgd-t", "fab", "square"]
    assert standard_ensemble("L1") == ["apgd", "apgd-t", "fab"]  # no Square in L1 here
    plan = Plan([], ["apgd", "apgd-t", "fab"], None, [])
    options = lambda method, **settings: attack_options(  # noqa: E731
        Job(method, 12.0, 100, attack="ensemble"), plan, Settings("m", "f", (12.0,), (100,), **settings))
    assert options("apgd", norm="L1")["restarts"] == 5 and options("apgd-t", norm="L1")["target_classes"] == 5
    assert options("fab", norm="L1")["target_classes"] is None, "FAB-T keeps its 9 targets in L1"
    assert options("apgd", norm="L2").get("restarts") is None and options("apgd", norm="L2")["norm"] == "L2"
    assert options("apgd-t", norm="L1", target_classes=3)["target_classes"] == 3, "--target-classes wins"
