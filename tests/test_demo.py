"""`make demo` (utils/demo.py) tells the story from the shell, and the README generator keeps only real output."""
import pytest

from tests.conftest import run_script
from utils.make_readme import without_progress_bars


def test_demo_tells_the_whole_story(tmp_path):
    result = run_script("utils/demo.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    if out[0].startswith("No network"):
        assert "efficientnet_lite0" in out[0]
        expected = ["Prediction: military uniform", "New prediction: goldfish, Carassius auratus"]
    else:  # a machine that could download the corgi and ResNet18's weights
        expected = ["Prediction: Pembroke, Pembroke Welsh corgi", "New prediction: goldfish, Carassius auratus"]
    for line in expected:
        assert line in out
    for step in ("step_2_pretrained.py", "step_3_adversarial.py", "step_5_perturb.py", "step_6_defend.py"):
        assert any(line.startswith(f"$ python {step}") for line in out)
    new_predictions = [line for line in out if line.startswith("New prediction: ")]
    assert new_predictions[-1] != "New prediction: goldfish, Carassius auratus", "JPEG should undo the attack"
    assert (tmp_path / "outputs" / "comparison.png").is_file() and (tmp_path / "outputs" / "adversarial.jpg").is_file()


@pytest.mark.parametrize("text, kept", [
    ("result 1\ntiming:  50%|#####     | 1/2 [00:01<00:01]\r   \nresult 2", "result 1\nresult 2"),
    ("no bars here\nline two", "no bars here\nline two"),
])
def test_readme_generator_drops_progress_bars_only(text, kept):
    assert without_progress_bars(text) == kept
