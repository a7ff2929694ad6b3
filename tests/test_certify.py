"""Step 10's verifiers: the layers read from a model's graph compute its logits, the bounds hold at every point
tried, the exact verifier agrees with a brute force over every lattice point of a tiny budget, nothing proved robust
is fooled by our attacks, every counterexample read back from its PNG is one, and the command line's outputs,
resume and bad input."""
import csv
import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from utils.models import Classifier, freeze, prepare_image, Preprocessing
import step_10_certify
import step_8_evaluate
from tests.conftest import run_in_process, run_main, run_script
from utils.files import temp_beside
from utils.attacks import run_attack
from utils.certify import CERTIFIERS
from utils.certify.bounds import layer_bounds, make_ball, margin_bounds
from utils.certify.bounds_certifier import BoundSettings, BoundsCertifier
from utils.certify.exact import ExactCertifier, ExactSettings
from utils.certify.network import evaluate, extract_layers
from utils.cli import UsageError
from utils.models import export_program
from utils.training import build_net

STEP_10 = "step_10_certify.py"


def classifier(net, side, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
    return freeze(Classifier(net, Preprocessing(side, mean, std), "net", memory_format=torch.contiguous_format,
                             classes=[str(k) for k in range(10)]))


class SmallConv(nn.Module):
    """Every operation the verifier encodes: conv, batch norm (eval), ReLU, max pool, average pools, flatten."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))

    def forward(self, x):
        return self.body(x)


def random_pixels(count, shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (count, *shape))).float() / 255


def assert_same_logits(model, shape):
    network = extract_layers(model, shape)
    pixels = random_pixels(6, shape)
    with torch.no_grad():
        expected = model(pixels).double().numpy()
    assert np.abs(evaluate(network, pixels.reshape(6, -1).double().numpy()) - expected).max() < 1e-5
    return network


def test_layers_of_an_mlp_and_a_convnet_give_the_models_logits():
    torch.manual_seed(0)
    mlp = assert_same_logits(classifier(build_net("mlp", 10, side=8), 8, (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)), (3, 8, 8))
    assert [type(layer).__name__ for layer in mlp.layers] == ["Affine", "ReLU", "Affine", "ReLU", "Affine"]
    net = SmallConv()
    net.body[1].running_mean.uniform_(-1, 1)
    net.body[1].running_var.uniform_(0.5, 2)
    conv = assert_same_logits(classifier(net, 8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), (3, 8, 8))
    assert [type(layer).__name__ for layer in conv.layers] == ["Affine", "ReLU", "MaxPool", "Affine", "ReLU", "Affine"]


def test_layers_of_a_saved_program_give_its_logits(tmp_path):
    from utils.models import load_model
    torch.manual_seed(1)
    path = tmp_path / "mlp.pt2"
    export_program(classifier(build_net("mlp", 10, side=8), 8, (0.1,) * 3, (0.5,) * 3), path,
                   [str(k) for k in range(10)], 8)
    assert_same_logits(load_model(str(path)), (3, 8, 8))


@pytest.mark.parametrize("activation, name", [(nn.Sigmoid(), "sigmoid"), (nn.Tanh(), "tanh"), (nn.GELU(), "gelu"),
                                              (nn.Softmax(dim=1), "softmax")])
def test_an_operation_the_verifier_cannot_encode_is_named(activation, name):
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), activation, nn.Linear(5, 10))
    with pytest.raises(UsageError, match=f"cannot encode {name}"):
        extract_layers(classifier(net, 2), (3, 2, 2))


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(12, 12), nn.Linear(12, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.second(torch.relu(self.first(x)) + x)


def test_a_skip_connection_is_refused():
    with pytest.raises(UsageError, match="skip connection"):
        extract_layers(classifier(Skip(), 2), (3, 2, 2))


# ---- bounds ---------------------------------------------------------------------------------------------------

def sensitive_net(seed, hidden=6):
    """A tiny MLP on 2x2x3 images, steep enough that a level or two changes some of its answers."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, 10))
    with torch.no_grad():
        net[1].weight.mul_(60)
    return classifier(net, 2)


def points_in(ball, count, rng):
    if ball.norm == "Linf":
        return rng.uniform(ball.lower, ball.upper, (count, len(ball.center)))
    change = rng.uniform(ball.lower, ball.upper, (count, len(ball.center))) - ball.center
    scale = np.minimum(1, ball.budget / np.maximum(np.abs(change).sum(axis=1), 1e-12))
    return ball.center + change * scale[:, None]


@pytest.mark.parametrize("norm, epsilon", [("Linf", 3), ("L1", 0.05)])
@pytest.mark.parametrize("propagation", ["crown", "interval"])
def test_bounds_hold_at_every_point_tried(norm, epsilon, propagation):
    rng = np.random.default_rng(0)
    for seed in range(4):
        model = sensitive_net(seed)
        network = extract_layers(model, (3, 2, 2))
        image = rng.integers(0, 256, (2, 2, 3)).astype(np.uint8)
        ball = make_ball(image, norm, epsilon, lattice=False)
        bounds = layer_bounds(network, ball, propagation)
        points = points_in(ball, 2000, rng)
        values = points
        for layer, (lower, upper) in zip(network.layers, bounds[1:]):
            values = evaluate(type(network)([layer], None), values)
            assert (values >= lower - 1e-9).all() and (values <= upper + 1e-9).all()
        label = int(np.argmax(values[0]))
        floor = margin_bounds(network, ball, label, bounds, propagation)
        others = [t for t in range(10) if t != label]
        assert (values[:, [label]] - values[:, others] >= floor[others] - 1e-9).all()


# ---- exact against a brute force ------------------------------------------------------------------------------

@functools.lru_cache
def lattice_changes(size, norm, levels):
    """Every change of `size` pixels in whole levels within the budget: each pixel by at most `levels` (Linf), or
    the absolute changes summing to at most `levels` (L1). Cached, read-only: the twelve cases share it (Linf at one
    level on 2x2x3 images: 3^12 = 531,441 changes)."""
    if norm == "Linf":  # itertools.product's rows, in its order, built by numpy
        steps = np.arange(-levels, levels + 1)
        changes = np.stack(np.meshgrid(*[steps] * size, indexing="ij"), axis=-1).reshape(-1, size)
        changes.flags.writeable = False
        return changes
    changes = [np.zeros(size, dtype=int)]
    for count in range(1, levels + 1):
        for positions in itertools.combinations(range(size), count):
            for sizes in itertools.product(range(1, levels + 1), repeat=count):
                if sum(sizes) > levels:
                    continue
                for signs in itertools.product((-1, 1), repeat=count):
                    change = np.zeros(size, dtype=int)
                    change[list(positions)] = np.array(sizes) * np.array(signs)
                    changes.append(change)
    changes = np.array(changes)
    changes.flags.writeable = False
    return changes


def lattice_points(image, norm, levels):
    """Every 8-bit image within the budget of `image`, as flat channel-first pixels in [0, 1]."""
    flat = image.astype(np.int64).transpose(2, 0, 1).reshape(-1)
    points = flat + lattice_changes(len(flat), norm, levels)
    return points[((points >= 0) & (points <= 255)).all(axis=1)] / 255


def brute_force_robust(model, image, label, norm, levels):
    pixels = torch.from_numpy(lattice_points(image, norm, levels)).float().reshape(-1, 3, 2, 2)
    with torch.no_grad():
        return bool((model(pixels).argmax(dim=1) == label).all())


def tiny_cases():
    """(model, image, label) on 2x2x3 images: 12 seeds, labels the clean predictions."""
    rng = np.random.default_rng(5)
    cases = []
    for seed in range(12):
        model = sensitive_net(seed)
        image = rng.integers(1, 255, (2, 2, 3)).astype(np.uint8)
        with torch.no_grad():
            label = int(model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255).argmax())
        cases.append((model, image, label))
    return cases


@pytest.mark.parametrize("norm, levels, epsilon", [("Linf", 1, 1), ("L1", 2, 2 / 255)])
def test_exact_agrees_with_every_lattice_point(norm, levels, epsilon):
    verdicts = []
    for model, image, label in tiny_cases():
        truth = brute_force_robust(model, image, label, norm, levels)
        exact = ExactCertifier(model, ExactSettings(norm, True, 30.0, 0), image_shape=(3, 2, 2))
        row = exact.certify(image, label, [epsilon])[0]
        assert row["verdict"] == ("robust" if truth else "not robust"), (norm, row)
        bounds = BoundsCertifier(model, BoundSettings(norm), image_shape=(3, 2, 2)).certify(image, label, [epsilon])[0]
        assert truth or bounds["verdict"] != "robust"  # the bounds never prove what is false
        verdicts.append(row["verdict"])
    assert {"robust", "not robust"} <= set(verdicts), verdicts  # the cases test both answers


def pooled_net(seed):
    """A tiny conv net on 2x2x3 images whose 2x2 max pool, behind two convolutions, has several candidates per
    window."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 5, 2, padding=1), nn.ReLU(), nn.Conv2d(5, 5, 2), nn.ReLU(),
                        nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(5, 10))
    with torch.no_grad():
        net[0].weight.mul_(40)
    return classifier(net, 2)


def test_the_milp_through_a_max_pool_agrees_with_every_lattice_point():
    """The program alone (no attack, bounds or branch and bound before it), with the loose interval bounds so the
    pool keeps binaries: a point with margin <= the threshold exists exactly when some lattice point has one. Each
    case moves the runner-up's bias so that its margin's lowest point over the lattice sits on either side of zero."""
    from utils.certify.exact import THRESHOLD
    from utils.certify.milp import MarginProgram
    rng = np.random.default_rng(3)
    answers, binaries = [], 0
    for seed in range(6):
        model, image = pooled_net(seed), rng.integers(1, 255, (2, 2, 3)).astype(np.uint8)
        pixels = torch.from_numpy(lattice_points(image, "Linf", 1)).float().reshape(-1, 3, 2, 2)
        with torch.no_grad():
            logits = model(pixels).double().numpy()
            label, runner = torch.topk(model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0], 2)[1]
            margin = logits[:, label] - logits[:, runner]
            shift = margin.min() - (0.02 if seed % 2 else -0.02) * (margin.max() - margin.min())
            model.net[-1].bias[runner] += shift  # the runner-up's margin now dips below zero for even seeds only
            logits = model(pixels).double().numpy()
            label = int(model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255).argmax())
        others = np.delete(np.arange(10), label)
        truth = (logits[:, [label]] - logits[:, others]).min() <= THRESHOLD
        network = extract_layers(model, (3, 2, 2))
        ball = make_ball(image, "Linf", 1, lattice=True)
        bounds = layer_bounds(network, ball, "interval")
        program = MarginProgram(network, ball, bounds, lattice=True)
        answer = program.solve(label, others, THRESHOLD, 30.0, bounds[-1])
        assert answer.status == ("found" if truth else "infeasible"), (seed, answer.status, truth)
        answers.append(answer.status)
        binaries += program.binaries
    assert set(answers) == {"found", "infeasible"} and binaries > 0, (answers, binaries)


def test_nothing_proved_robust_is_fooled_by_our_attacks():
    for model, image, label in tiny_cases():
        rows = ExactCertifier(model, ExactSettings("Linf", True, 30.0, 0), image_shape=(3, 2, 2)).certify(
            image, label, [1, 2, 4])
        for row in rows:
            for method in ("pgd", "apgd"):
                adversarial, _ = run_attack(model, method, [image], [label], epsilon=row["epsilon"], steps=100,
                                            targeted=False, seed=0, random_start=True)
                with torch.no_grad():
                    fooled = int(model(torch.from_numpy(adversarial[0]).permute(2, 0, 1)[None].float() / 255)
                                 .argmax()) != label
                assert not (fooled and row["verdict"] == "robust"), (method, row)
            if row["verdict"] == "not robust":
                change = np.abs(row["counterexample"].astype(int) - image.astype(int)).max()
                assert change <= row["epsilon"]


def test_the_registry_names_each_certifier_with_its_columns():
    """Each certifier, made as step 10 makes it from its command line, in each norm it names, certifies a tiny case
    with rows that hold exactly the columns it names, in their order, after the common ones, and verdicts it names."""
    assert set(CERTIFIERS) >= {"exact", "bounds", "smoothing"}
    model, image, label = tiny_cases()[0]
    common = ["label", "epsilon", "verdict", "prediction", "seconds", "counterexample", "file"]
    for name, kind in CERTIFIERS.items():
        assert kind.name == name and kind.norms and set(kind.norms) <= {"Linf", "L1", "L2"}
        for norm in kind.norms:
            args = step_10_certify.get_args_parser().parse_args(
                ["photos", "--method", name, "--norm", norm, "--sigma", "0.25", "--n0", "10", "--n", "100",
                 "--batch-size", "100", "--time-limit", "30", "--device", "cpu"])
            certifier = step_10_certify.make_certifier(args, model, (3, 2, 2))
            epsilons = [1 if norm == "Linf" else 2 / 255] if kind.uses_epsilons else []
            rows = certifier.certify(image, label, epsilons)
            assert len(rows) == max(len(epsilons), 1), (name, norm)
            for row in rows:
                assert tuple(key for key in row if key not in common) == tuple(kind.columns), (name, norm, list(row))
                assert row["verdict"] in kind.verdicts or (name == "smoothing" and row["verdict"] == "abstain"), row


# ---- the command line -----------------------------------------------------------------------------------------

def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.smoke
def test_step_10_writes_verdicts_counterexamples_and_a_summary(digits_setup, tmp_path):
    out = tmp_path / "out"
    result = run_script(STEP_10, digits_setup / "digits", "--model", digits_setup / "mlp.pt2", "--method", "exact",
                        "--epsilons", "4,1", "--time-limit", "20", "--output-dir", out, "--threads", "1",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_csv(out / "certified.csv")
    assert list(rows[0]) == ["image", "label", "epsilon", "verdict", "prediction", "seconds", "found_by",
                             "margin_bound", "domains", "binaries", "constraints", "file"]
    assert len(rows) == 8 and [row["epsilon"] for row in rows[:2]] == ["1", "4"]
    assert {row["verdict"] for row in rows} <= {"robust", "not robust", "unknown", "misclassified"}
    model_file = digits_setup / "mlp.pt2"
    from utils.models import load_model, predict_images
    model = load_model(str(model_file))
    for row in rows:
        if row["verdict"] == "not robust":
            back = np.asarray(Image.open(out / row["file"]).convert("RGB"))
            original = np.asarray(Image.open(digits_setup / "digits" / row["image"]).convert("RGB"))
            assert predict_images(model, [back])[0] != int(row["label"])
            assert np.abs(back.astype(int) - original.astype(int)).max() <= float(row["epsilon"])
        else:
            assert row["file"] == ""
    summary = (out / "summary.md").read_text()
    assert "| epsilon | images | robust |" in summary and (out / "certified_accuracy.png").stat().st_size > 1000
    bounds_out = tmp_path / "bounds"  # the second run in process: one fresh process per program is enough here
    result = run_main(step_10_certify, digits_setup / "digits", "--model", model_file, "--method", "bounds",
                      "--epsilons", "1,4", "--output-dir", bounds_out)
    assert result.returncode == 0, result.stderr
    for exact, bound in zip(rows, read_csv(bounds_out / "certified.csv")):
        assert (exact["image"], exact["epsilon"]) == (bound["image"], bound["epsilon"])
        assert not (bound["verdict"] == "robust" and exact["verdict"] == "not robust")


@pytest.mark.slow
def test_step_10_resumes_and_ignores_a_torn_last_line(digits_setup, tmp_path):
    out = tmp_path / "out"
    args = [digits_setup / "digits", "--model", digits_setup / "mlp.pt2", "--method", "bounds", "--epsilons", "2,8",
            "--output-dir", out]
    assert run_script(STEP_10, *args, cwd=tmp_path).returncode == 0
    whole = (out / "certified.csv").read_text()
    lines = whole.splitlines(keepends=True)
    (out / "certified.csv").write_text("".join(lines[:-2]) + lines[-2][:10])  # the last image half-written
    killed_writes = [temp_beside(out / "certified.csv"), temp_beside(out / "counterexamples" / "0001.png")]
    result = run_script(STEP_10, *args, "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Certifying 1 of 4 images" in result.stderr
    assert not any(path.exists() for path in killed_writes), "a killed write's temp file is no output: it goes"
    # the same rows in the same order (seconds aside: a clock's reading)
    assert [line.split(",")[:5] for line in (out / "certified.csv").read_text().splitlines()] == \
        [line.split(",")[:5] for line in whole.splitlines()]


def sigmoid_model(folder):
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), nn.Sigmoid(), nn.Linear(8, 10))
    model = Classifier(net, Preprocessing(32, (0.0,) * 3, (1.0,) * 3), memory_format=torch.contiguous_format)
    export_program(model, folder / "sigmoid.pt2", [str(k) for k in range(10)], 32)
    return folder / "sigmoid.pt2"


@pytest.mark.parametrize("extra, message", [
    (["--time-limit", "0"], "--time-limit"), (["--time-limit", "soon"], "--time-limit"),
    (["--norm", "L2"], "not --norm L2"), (["--method", "magic"], "--method"),
    (["--epsilons", "300"], "--epsilons 300: a Linf budget must be in [0, 255]"),
    (["SIGMOID"], "cannot encode sigmoid"),
    (["--alpha-iterations", "0"], "--alpha-iterations"), (["--batch-size", "0"], "--batch-size"),
    (["--method", "bounds", "--propagation", "beta"], "propagation")])
def test_bad_input_is_one_line_and_writes_nothing(digits_setup, tmp_path, extra, message):
    check_bad_input(run_in_process, digits_setup, tmp_path, extra, message)


def test_bad_input_from_the_shell(digits_setup, tmp_path):
    """One of them as a user meets it: a fresh process, its `__main__` and the interpreter's own exit."""
    check_bad_input(run_script, digits_setup, tmp_path, ["--time-limit", "0"], "--time-limit")


def check_bad_input(run, digits_setup, tmp_path, extra, message):
    model = digits_setup / "mlp.pt2"
    if extra == ["SIGMOID"]:
        model, extra = sigmoid_model(tmp_path), []
    out = tmp_path / "never"
    result = run(STEP_10, digits_setup / "digits", "--model", model, "--output-dir", out, *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("Certifying")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def test_step_10_smoothing_writes_a_radius_per_image_from_its_own_counts(digits_setup, tmp_path):
    from scipy.stats import norm
    from utils.certify.smoothing import lower_confidence_bound
    args = [digits_setup / "digits", "--model", digits_setup / "mlp.pt2", "--method", "smoothing", "--sigma", "0.25",
            "--n0", "10", "--n", "100", "--batch-size", "50", "--radii", "0,0.2", "--threads", "1"]
    outs = []
    for name in ("one", "two"):
        result = run_script(STEP_10, *args, "--output-dir", tmp_path / name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        outs.append(tmp_path / name)
    assert "L2" in result.stderr and "radius 0.2: certified accuracy" in result.stdout
    assert "no radius above" in result.stdout and "within L2 radius" in result.stdout  # 4 images: each one said
    rows = read_csv(outs[0] / "certified.csv")
    assert list(rows[0]) == ["image", "label", "epsilon", "verdict", "prediction", "seconds", "radius", "n_a", "n",
                             "file"]
    assert len(rows) == 4 and {row["epsilon"] for row in rows} == {""}
    for row in rows:
        p_lower = lower_confidence_bound(int(row["n_a"]), int(row["n"]), 0.001)
        assert row["n"] == "100" and row["verdict"] in {"robust", "misclassified", "abstain"}
        if row["verdict"] == "abstain":
            assert p_lower <= 0.5 and row["radius"] == ""
        else:
            assert float(row["radius"]) == pytest.approx(0.25 * norm.ppf(p_lower), rel=1e-5)
            assert (row["verdict"] == "robust") == (row["prediction"] == row["label"])
    robust_at = sum(row["verdict"] == "robust" and float(row["radius"]) >= 0.2 for row in rows)
    assert f"| {robust_at / 4:.0%} ({robust_at}/4) |" in (outs[0] / "summary.md").read_text()
    without_seconds = [[{k: v for k, v in row.items() if k != "seconds"} for row in read_csv(out / "certified.csv")]
                       for out in outs]
    assert without_seconds[0] == without_seconds[1]  # same seed, same counts
    assert (outs[0] / "certified_accuracy.png").stat().st_size > 1000


def test_step_10_resumes_only_with_the_settings_its_rows_were_made_with(digits_setup, tmp_path):
    """A row certified at one sigma is no certificate at another: --resume with other settings that decide the rows
    is refused in one line naming them, before anything is written; a setting that changes no row (the smoothing's
    batch size: same counts whatever it is) may change."""
    out = tmp_path / "out"
    args = [digits_setup / "digits", "--model", digits_setup / "mlp.pt2", "--method", "smoothing", "--n0", "10",
            "--n", "40", "--threads", "1", "--output-dir", out]
    assert run_main(step_10_certify, *args, "--sigma", "0.25", "--batch-size", "20").returncode == 0
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    refused = run_main(step_10_certify, *args, "--sigma", "0.12", "--batch-size", "20", "--resume")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "sigma 0.25" in refused.stderr and "sigma 0.12" in refused.stderr and "--resume" in refused.stderr
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before
    resumed = run_main(step_10_certify, *args, "--sigma", "0.25", "--batch-size", "40", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Certifying 0 of 4 images" in resumed.stderr
    fresh = run_main(step_10_certify, *args, "--sigma", "0.12", "--batch-size", "20")  # without --resume: a new run
    assert fresh.returncode == 0, fresh.stderr
    assert "Certifying 4 of 4 images" in fresh.stderr


def test_step_10_resumes_only_on_the_model_its_rows_were_made_with(digits_setup, tmp_path):
    """Rows proved for one network are no proof for another: --resume with a model of other weights (same
    architecture, same classes) is refused in one line, before anything is written."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Linear(16, 10))
    other = Classifier(net, Preprocessing(32, (0.3,) * 3, (0.4,) * 3), memory_format=torch.contiguous_format)
    export_program(freeze(other), tmp_path / "other.pt2", [str(k) for k in range(10)], 32)
    out = tmp_path / "out"
    args = [digits_setup / "digits", "--method", "bounds", "--epsilons", "2", "--threads", "1", "--output-dir", out]
    assert run_main(step_10_certify, *args, "--model", digits_setup / "mlp.pt2").returncode == 0
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    refused = run_main(step_10_certify, *args, "--model", tmp_path / "other.pt2", "--resume")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "made with model" in refused.stderr and "--resume" in refused.stderr, refused.stderr
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before
    resumed = run_main(step_10_certify, *args, "--model", digits_setup / "mlp.pt2", "--resume")
    assert resumed.returncode == 0 and "Certifying 0 of 4 images" in resumed.stderr, resumed.stderr


@pytest.mark.parametrize("extra, message", [
    (["--sigma", "0"], "--sigma"), (["--alpha", "0.7"], "--alpha"), (["--n", "0"], "--n"), ([], "needs --sigma"),
    (["--sigma", "0.25", "--norm", "Linf"], "not --norm Linf"),
    (["--sigma", "0.25", "--epsilons", "2"], "--epsilons does not apply")])
def test_bad_smoothing_input_is_one_line_and_writes_nothing(digits_setup, tmp_path, extra, message):
    out = tmp_path / "never"
    result = run_in_process(STEP_10, digits_setup / "digits", "--model", digits_setup / "mlp.pt2", "--method",
                            "smoothing", "--output-dir", out, *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert not out.exists()


STEP_8 = "step_8_evaluate.py"
STEP_8_QUICK = ["--epsilons", "4,16", "--steps", "10", "--queries", "100", "--batch-size", "4", "--threads", "1"]


def test_step_8_certify_bounds_robust_accuracy_from_below(digits_setup, tmp_path, monkeypatch):
    """Step 8's command line in process (its fresh-process run is tests/test_evaluate.py's smoke test). The two
    certifiers share one decoding of each photo."""
    from utils.evaluation import interval
    decoded = []
    monkeypatch.setattr(interval, "prepare_image", lambda path, model: (decoded.append(Path(path).name),
                                                                        prepare_image(path, model))[1])
    out = tmp_path / "eval"
    result = run_main(step_8_evaluate, digits_setup / "digits", "--model", digits_setup / "mlp.pt2", *STEP_8_QUICK,
                      "--certify", "exact,bounds", "--time-limit", "20", "--output-dir", out)
    assert result.returncode == 0, result.stderr
    accuracy = read_csv(out / "robust_accuracy.csv")
    assert list(accuracy[0]) == ["norm", "epsilon", "attack", "images", "clean_accuracy", "robust_accuracy",
                                 "certified_accuracy"]
    exact = read_csv(out / "certified" / "exact" / "certified.csv")
    bounds = read_csv(out / "certified" / "bounds" / "certified.csv")
    assert len(exact) == len(bounds) == 8
    assert sorted(decoded) == sorted({row["image"].split("/")[-1] for row in exact}) and len(decoded) == 4
    for row in accuracy:
        proved = max(sum(r["verdict"] == "robust" and r["epsilon"] == row["epsilon"] for r in rows)
                     for rows in (exact, bounds))
        assert float(row["certified_accuracy"]) == proved / 4
        assert float(row["certified_accuracy"]) <= float(row["robust_accuracy"])  # certified <= attacked
    summary = (out / "summary.md").read_text()
    assert "## Robust accuracy as an interval" in summary and "| exact: proved robust |" in summary
    assert "6. **PASS** no photo is both proved robust and fooled" in summary
    assert (out / "robust_interval.png").stat().st_size > 1000
    fooled = {(row["epsilon"], row["image"]) for row in read_csv(out / "results.csv")
              if row["attack"] == "ensemble" and row["success"] == "1"}
    assert not {(row["epsilon"], row["image"]) for row in exact + bounds if row["verdict"] == "robust"} & fooled


def test_the_sixth_check_fails_on_a_photo_proved_robust_and_fooled():
    from utils.evaluation.checks import check_proved_not_fooled
    from utils.evaluation.plan import Settings
    rows = [{"epsilon": "8", "image": "a.png", "attack": "ensemble", "success": "1"},
            {"epsilon": "8", "image": "b.png", "attack": "ensemble", "success": "0"}]
    settings = Settings(model="m", folder="f", epsilons=(8.0,), steps=(10,))
    proved_b = {"exact": [{"image": "b.png", "epsilon": "8", "verdict": "robust"}]}
    proved_a = {"exact": [{"image": "a.png", "epsilon": "8", "verdict": "robust"}]}
    assert check_proved_not_fooled(rows, proved_b, None, settings)[0] is True
    ok, text = check_proved_not_fooled(rows, proved_a, None, settings)
    assert ok is False and "1 of them fooled (a.png)" in text


@pytest.mark.parametrize("extra, message", [
    (["--certify", "magic"], "--certify"), (["--certify", "smoothing"], "--certify"),
    (["--certify", "exact", "--time-limit", "0"], "--time-limit"), (["SIGMOID", "--certify", "exact"], "sigmoid"),
    (["UNLABELLED", "--certify", "exact"], "needs true labels")])
def test_step_8_certify_bad_input_is_one_line_and_writes_nothing(digits_setup, tmp_path, extra, message):
    folder, model = digits_setup / "digits", digits_setup / "mlp.pt2"
    if extra[0] == "SIGMOID":
        model, extra = sigmoid_model(tmp_path), extra[1:]
    if extra[0] == "UNLABELLED":
        folder, extra = sorted((digits_setup / "digits").iterdir())[0], extra[1:]  # one class's folder: no labels
    out = tmp_path / "never"
    result = run_in_process(STEP_8, folder, "--model", model, *STEP_8_QUICK, "--output-dir", out, *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert not out.exists()


@pytest.mark.crosscheck
def test_nothing_proved_robust_is_fooled_by_the_reference_autoattack(digits_setup):
    from utils.evaluation.reference import reference_robust
    from utils.images import to_tensor
    from utils.models import load_model
    model = load_model(str(digits_setup / "mlp.pt2"))
    paths = sorted((digits_setup / "digits").glob("*/*.png"))
    images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    labels = [int(path.parent.name) for path in paths]
    certifier = ExactCertifier(model, ExactSettings("Linf", True, 20.0, 0))
    proved_somewhere = False
    for epsilon in (4, 16):
        proved = [certifier.certify(image, label, [epsilon])[0]["verdict"] == "robust"
                  for image, label in zip(images, labels)]
        robust, _ = reference_robust(model, to_tensor(images), torch.tensor(labels), epsilon)
        assert not any(p and not r for p, r in zip(proved, robust.tolist())), (epsilon, proved, robust)
        proved_somewhere |= any(proved)
    assert proved_somewhere  # the check had something to check


@pytest.mark.parametrize("norm, epsilon", [("Linf", 8), ("L1", 0.3)])
def test_bounds_through_convolution_batch_norm_and_max_pool_hold(norm, epsilon):
    rng = np.random.default_rng(1)
    for seed in range(3):
        torch.manual_seed(seed)
        net = SmallConv()
        net.body[1].running_var.uniform_(0.5, 2)
        network = extract_layers(classifier(net, 8), (3, 8, 8))
        ball = make_ball(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8), norm, epsilon, lattice=False)
        bounds = layer_bounds(network, ball, "crown")
        values = points_in(ball, 2000, rng)
        for layer, (lower, upper) in zip(network.layers, bounds[1:]):
            values = evaluate(type(network)([layer], None), values)
            assert (values >= lower - 1e-9).all() and (values <= upper + 1e-9).all()
        label = int(np.argmax(values[0]))
        floor = margin_bounds(network, ball, label, bounds)
        others = [t for t in range(10) if t != label]
        assert (values[:, [label]] - values[:, others] >= floor[others] - 1e-9).all()


def test_an_image_is_finished_when_its_kept_rows_cover_every_epsilon():
    from utils.certify.run import finished
    kept = [{"image": "a.png", "epsilon": "8"}, {"image": "a.png", "epsilon": "16"}, {"image": "b.png", "epsilon": "8"},
            {"image": "c.png", "epsilon": ""}]
    assert finished(kept, ["a.png", "b.png", "d.png"], {"8", "16"}) == {"a.png"}
    assert finished(kept, ["a.png", "b.png"], {"8"}) == {"a.png", "b.png"}
    assert finished(kept, ["c.png", "a.png"], {""}) == {"c.png"}  # smoothing: one row per image, no epsilon
