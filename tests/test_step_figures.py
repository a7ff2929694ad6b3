"""Each tutorial step draws its picture into its output folder, and --no-figure leaves it out (the step's other
outputs still written). In process on the tiny model file, with a step or two of each attack: seconds in all."""
import numpy as np
import pytest
from PIL import Image

from tests.conftest import GRACE_HOPPER, run_in_process

# step: (its arguments beyond the photo and the model, the figure's path, another file the step writes), paths
# relative to the run's folder
STEPS = {
    "step_2_pretrained.py": (["--output-dir", "out"], "out/predictions.png", None),
    "step_3_adversarial.py": (["--perturbation", "r.npy", "--output", "out/adversarial.png"], "out/applied.png",
                              "out/adversarial.png"),
    "step_5_perturb.py": (["--steps", "2", "--output-dir", "out"], "out/comparison.png", "out/adversarial.png"),
    "step_6_defend.py": (["--output", "out/defended.jpg"], "out/defense.png", "out/defended.jpg"),
    "step_7_break_defense.py": (["--steps", "2", "--output-dir", "out"], "out/break_defense.png", "out/adaptive.png"),
}


def run_step(script, tmp_path, tiny_program, *extra):
    np.save(tmp_path / "r.npy", np.random.default_rng(0).normal(0, 0.05, (1, 3, 32, 32)).astype(np.float32))
    args, _, _ = STEPS[script]
    result = run_in_process(script, GRACE_HOPPER, "--model", tiny_program, "--device", "cpu", *args, *extra,
                            cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr  # 1: a step's attack of two steps may not get there
    assert result.stderr == "" or "Traceback" not in result.stderr, result.stderr
    return result


@pytest.mark.parametrize("script", sorted(STEPS))
def test_each_step_draws_its_figure(script, tiny_program, tmp_path):
    result = run_step(script, tmp_path, tiny_program)
    figure = tmp_path / STEPS[script][1]
    with Image.open(figure) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert 400 <= width <= 2000 and 250 <= height <= 1500, image.size  # a few panels at 100 dpi, no runaway size
    assert pixels.std() > 20, "a figure with pictures and text, not a blank page"
    assert not list(figure.parent.glob(".*.tmp*")), "no temp file left beside it"
    printed = [line for line in result.stdout.splitlines() if line.startswith("Figure: ")]
    # only step 6 already printed the paths it writes; it names its figure too, the others print as before
    assert printed == ([f"Figure: {STEPS[script][1]}"] if script == "step_6_defend.py" else [])


@pytest.mark.parametrize("script", sorted(STEPS))
def test_no_figure_draws_none(script, tiny_program, tmp_path):
    result = run_step(script, tmp_path, tiny_program, "--no-figure")
    _, figure, other = STEPS[script]
    assert not (tmp_path / figure).exists()
    assert other is None or (tmp_path / other).is_file(), "the step's other outputs are still written"
    assert "Figure: " not in result.stdout
    if script == "step_2_pretrained.py":
        assert not (tmp_path / "out").exists() and result.stdout.startswith("Prediction: ")


def test_the_top_classes_figure_draws_at_most_most_bars(tiny_model):
    """--top-k 1000 lists every class but draws the first MOST_BARS: a figure of readable size."""
    from utils.figures import MOST_BARS, predictions_figure
    image = np.zeros((32, 32, 3), np.uint8)
    figure = predictions_figure(image, tiny_model.classes, np.linspace(0.5, 0, len(tiny_model.classes)))
    bars = figure.axes[1]  # beside the photo
    assert len(bars.get_yticklabels()) == MOST_BARS and figure.get_size_inches()[1] < 10
