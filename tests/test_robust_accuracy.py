"""utils.evaluation.robust_accuracy, step 8's robust accuracy as a library call: the same verdicts and numbers as step 8
on the same images and settings, a plain nn.Module taken as it is, and each bad input refused in one sentence."""
import csv
import functools

import pytest
import torch
from torch import nn

from tests.conftest import make_tiny_model, run_in_process
from utils.cli import UsageError
from utils.data import find_photos
from utils.evaluation import RobustAccuracy, robust_accuracy
from utils.models import find_class, load_model, normalized, prepare_image

# a few steps and queries: seconds on the digits MLP, yet a mix of robust, fooled and misclassified digits
FAST = {"steps": 5, "queries": 50, "batch_size": 3}


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def digits(digits_setup):
    """The digits MLP as step 8 loads it, the four digits as step 8 decodes them (its order) and their labels."""
    model_file = digits_setup / "mlp.pt2"
    model = load_model(str(model_file), "cpu")
    photos = find_photos(digits_setup / "digits", None, functools.partial(find_class, classes=model.classes))
    images = torch.stack([torch.from_numpy(prepare_image(path, model)).permute(2, 0, 1) for path in photos.paths])
    return model_file, model, photos, images


def step_8(digits_setup, model_file, out, norm, epsilon, certify):
    """Step 8's command line, in this process, on the digits folder with FAST's settings."""
    extra = ["--certify", certify] if certify else []
    result = run_in_process("step_8_evaluate.py", digits_setup / "digits", "--model", model_file, "--norm", norm,
                            "--epsilons", epsilon, "--steps", FAST["steps"], "--queries", FAST["queries"],
                            "--batch-size", FAST["batch_size"], "--threads", 1, "--output-dir", out, *extra,
                            cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return read_csv(out / "results.csv"), read_csv(out / "robust_accuracy.csv")


@pytest.mark.parametrize("norm, epsilon, certify", [("Linf", 16, "bounds"), ("L2", 2.5, None)])
def test_the_call_gives_step_8s_verdicts_and_numbers(digits_setup, digits, tmp_path, norm, epsilon, certify):
    model_file, model, photos, images = digits
    rows, accuracy = step_8(digits_setup, model_file, tmp_path / "out", norm, epsilon, certify)
    result = robust_accuracy(model, images, photos.labels, norm=norm, epsilon=epsilon, certify=certify, **FAST)

    fooled = {row["image"] for row in rows if row["attack"] == "ensemble" and row["success"] == "1"}
    assert result.fooled.tolist() == [name in fooled for name in photos.names], "per image: fooled as in step 8"
    assert 0 < result.fooled.sum() < len(images), "the settings give a mix, so the comparison says something"
    by_attack = {row["attack"]: row for row in accuracy}
    assert result.per_attack == {attack: pytest.approx(float(by_attack[attack]["robust_accuracy"]), abs=1e-6)
                                 for attack in result.attacks}
    assert result.robust_accuracy == pytest.approx(float(by_attack["worst-case"]["robust_accuracy"]), abs=1e-6)
    assert result.clean_accuracy == pytest.approx(float(by_attack["worst-case"]["clean_accuracy"]), abs=1e-6)
    assert result.attacks == ["apgd", "apgd-t", "fab", "square"], "step 8's default ensemble in both norms"
    if certify:
        assert result.certified == pytest.approx(float(by_attack["worst-case"]["certified_accuracy"]), abs=1e-6)
        assert result.interval == (result.certified, result.robust_accuracy)

    fooling = {row["image"]: row for row in rows if row["attack"] == "ensemble" and row["success"] == "1"}
    for index, name in enumerate(photos.names):
        if name in fooling:  # the fooling image is the PNG step 8 saved, pixel for pixel; its size is step 8's
            png = torch.from_numpy(prepare_image(tmp_path / "out" / fooling[name]["file"], model)).permute(2, 0, 1)
            assert torch.equal(result.adversarial[index], png)
            assert f"{result.distances[index].item():{'.0f' if norm == 'Linf' else '.4f'}}" == fooling[name]["size"]
            assert result.distances[index] <= epsilon + 1e-6
        else:
            assert torch.equal(result.adversarial[index], images[index]), "not fooled: the original"


class Plain(nn.Module):
    """A user's model as it comes: pixels in [0, 1] in, logits out, the normalization inside, no Classifier."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pixels):
        return self.net(pixels)


def test_a_plain_module_is_taken_as_it_is_and_left_as_it_was(tiny_images):
    classifier = make_tiny_model()
    plain = normalized(classifier).train()  # the tiny network with its normalization in front: a plain nn.Module
    labels = torch.tensor([3, 1, 4, 1])
    labels[:2] = classifier(tiny_images[:2]).argmax(dim=1)  # two correct when clean, two not
    for parameter in plain.parameters():
        parameter.requires_grad_(True)
    settings = dict(epsilon=2, attacks=["apgd", "square"], steps=3, queries=20, batch_size=2)
    found = robust_accuracy(plain, tiny_images, labels, **settings)
    expected = robust_accuracy(classifier, (tiny_images * 255).round().to(torch.uint8), labels, **settings)
    assert isinstance(found, RobustAccuracy) and found.clean_accuracy == 0.5
    assert found.fooled.tolist() == expected.fooled.tolist() and found.per_attack == expected.per_attack
    assert torch.equal(found.adversarial, expected.adversarial)
    assert found.adversarial.dtype == torch.uint8 and found.adversarial.shape == (4, 3, 32, 32)
    assert found.distances[2:].tolist() == [0.0, 0.0], "misclassified when clean: distance 0, not fooled"
    assert not found.fooled[2:].any()
    assert plain.training and all(p.requires_grad for p in plain.parameters()), "the user's module is left as it was"
    assert "robust_accuracy=" in repr(found) and "tensor" not in repr(found)


def test_the_fast_ensemble_is_apgd_and_apgd_t_towards_three_classes(tiny_images):
    """attacks="fast" is the same run as naming its stages and their target classes, in every norm (Square, FAB-T:
    none); a caller's target_classes wins over its three; "standard" is the default's."""
    from utils.evaluation.plan import named_ensemble
    model, images = make_tiny_model(), (tiny_images * 255).round().to(torch.uint8)
    labels = model(tiny_images).argmax(dim=1)
    settings = dict(epsilon=4, steps=3, queries=20, batch_size=2)
    fast = robust_accuracy(model, images, labels, attacks="fast", **settings)
    named = robust_accuracy(model, images, labels, attacks=["apgd", "apgd-t"], target_classes=3, **settings)
    # (one restart: AutoAttack's outside L1, where the fast ensemble keeps it too)
    assert fast.attacks == ["apgd", "apgd-t"] and fast.per_attack == named.per_attack
    assert torch.equal(fast.adversarial, named.adversarial) and fast.fooled.any()
    assert robust_accuracy(model, images, labels, attacks="standard", **settings).attacks == \
        robust_accuracy(model, images, labels, **settings).attacks == ["apgd", "apgd-t", "fab", "square"]
    assert [named_ensemble("fast", norm) for norm in ("Linf", "L2", "L1")] == [(["apgd", "apgd-t"], 3, 1)] * 3
    assert named_ensemble("fast", "L1", 5) == (["apgd", "apgd-t"], 5, 1)
    assert named_ensemble("standard", "L1") == (["apgd", "apgd-t", "fab"], None, None)
    from utils.evaluation.plan import Settings, stage_options
    l1 = dict(model="m", folder="f", epsilons=(1.0,), steps=(3,), norm="L1")
    assert stage_options("apgd", Settings(**l1)) == {"restarts": 5}, "AutoAttack's L1 setting"
    assert stage_options("apgd", Settings(**l1, target_classes=3, restarts=1)) == {"restarts": 1, "target_classes": 3}
    assert stage_options("apgd-t", Settings(**l1, target_classes=3, restarts=1)) == {"target_classes": 3}


GOOD = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)


@pytest.mark.parametrize("images, labels, options, message", [
    (torch.zeros(2, 8, 8, dtype=torch.uint8), [0, 0], {}, "images must have shape (N, 3, H, W)"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), [0, 0], {}, "got (2, 1, 8, 8)"),
    (GOOD, [0, 0, 0], {}, "labels must be 2 class indices (one per image), got shape (3,)"),
    (GOOD, [0.5, 1.0], {}, "labels must be integer class indices"),
    (GOOD, [0, 1000], {}, "labels must be class indices below the model's 1000 outputs, got 1000"),
    (torch.full((2, 3, 8, 8), 1.5), [0, 0], {}, "float images must lie in [0, 1], got values from 1.5 to 1.5"),
    (torch.full((2, 3, 8, 8), -0.1), [0, 0], {}, "float images must lie in [0, 1]"),
    (torch.full((2, 3, 8, 8), 0.5), [0, 0], {}, "float images must be 8-bit images k/255"),
    (GOOD, [0, 0], {"norm": "L3"}, "norm 'L3': choose from Linf, L2, L1"),
    (GOOD, [0, 0], {"norm": "linf", "attacks": ["apgd"]}, "norm 'linf': choose from Linf, L2, L1"),
    (GOOD, [0, 0], {"attacks": ["apgd", "bogus"]}, "attacks: unknown attack 'bogus'; choose from"),
    (GOOD, [0, 0], {"norm": "L1", "epsilon": 5, "attacks": ["square"]}, "attacks: square has no L1 version"),
    (GOOD, [0, 0], {"epsilon": 300}, "epsilon must be in (0, 255], got 300"),
    (GOOD, [0, 0], {"certify": "smoothing"}, "certify 'smoothing': choose from"),
    (GOOD, [0, 0], {"norm": "L2", "epsilon": 0.5, "certify": "exact"}, "certify exact certifies Linf, L1, not norm L2"),
    (GOOD, [0, 0], {"steps": 0}, "steps must be a whole number >= 1, got 0"),
])
def test_bad_input_is_one_clear_error(images, labels, options, message):
    with pytest.raises(UsageError) as error:
        robust_accuracy(make_tiny_model(), images, labels, **options)
    assert message in str(error.value), str(error.value)
    assert "--" not in str(error.value), "a library call names its parameters, not step 8's flags"
