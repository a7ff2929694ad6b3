"""Bad input: one line on stderr naming the problem, exit status 2, no traceback and no output file."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import GRACE_HOPPER, OFFLINE, REPO, run_in_process, run_script
from tests.test_tutorial_units import tiny_png_header, truncated_jpeg


@pytest.fixture
def files(tmp_path):
    """Bad (and good) inputs in a folder of their own."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "notes.png").write_text("this is not an image")
    (folder / "bomb.png").write_bytes(tiny_png_header(40000, 40000))
    truncated_jpeg(folder / "cut.jpg")
    np.save(folder / "wrong_shape.npy", np.zeros((1, 3, 32, 32), np.float32))
    np.save(folder / "ints.npy", np.zeros((1, 3, 224, 224), np.int16))
    np.save(folder / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / "empty").mkdir()
    return folder


CASES = {
    "step_2 missing": ("step_2_pretrained.py", ["{in}/missing.png"], "no such file"),
    "step_2 not an image": ("step_2_pretrained.py", ["{in}/notes.png"], "not an image"),
    "step_2 truncated": ("step_2_pretrained.py", ["{in}/cut.jpg"], "truncated"),
    "step_2 bomb": ("step_2_pretrained.py", ["{in}/bomb.png"], "decompression bomb"),
    "step_2 unknown model": ("step_2_pretrained.py", ["{gh}", "--model", "resnet81"], "unknown model"),
    "step_2 top-k": ("step_2_pretrained.py", ["{gh}", "--top-k", "0"], "--top-k"),
    "step_3 no perturbation": ("step_3_adversarial.py", ["{gh}", "--perturbation", "{in}/none.npy"], "no such perturbation"),
    "step_3 wrong shape": ("step_3_adversarial.py", ["{gh}", "--perturbation", "{in}/wrong_shape.npy"], "shape"),
    "step_3 ints": ("step_3_adversarial.py", ["{gh}", "--perturbation", "{in}/ints.npy"], "float"),
    "step_3 pickle": ("step_3_adversarial.py", ["{gh}", "--perturbation", "{in}/pickled.npy"], "pickle"),
    "step_3 lossy output": ("step_3_adversarial.py", ["{gh}", "--output", "{out}/x.jpg"], ".png"),
    "step_5 unknown target": ("step_5_perturb.py", ["{gh}", "--target", "unicorn"], "unknown class name"),
    "step_5 ambiguous target": ("step_5_perturb.py", ["{gh}", "--target", "crane"], "ambiguous"),
    "step_5 target range": ("step_5_perturb.py", ["{gh}", "--target", "1000"], "out of range"),
    "step_5 epsilon 0": ("step_5_perturb.py", ["{gh}", "--epsilon", "0"], "--epsilon"),
    "step_5 epsilon 256": ("step_5_perturb.py", ["{gh}", "--epsilon", "256"], "--epsilon"),
    "step_5 epsilon text": ("step_5_perturb.py", ["{gh}", "--epsilon", "ten"], "--epsilon"),
    "step_5 steps 0": ("step_5_perturb.py", ["{gh}", "--steps", "0"], "--steps"),
    "step_5 unknown method": ("step_5_perturb.py", ["{gh}", "--method", "magic"], "--method"),
    "step_5 not an image": ("step_5_perturb.py", ["{in}/notes.png"], "not an image"),
    "step_5 truncated": ("step_5_perturb.py", ["{in}/cut.jpg"], "truncated"),
    "step_5 empty folder": ("step_5_perturb.py", ["{in}/empty"], "holds no images"),
    "step_5 target and untargeted": ("step_5_perturb.py", ["{gh}", "--target", "1", "--untargeted"], "exclude"),
    "step_5 unknown model": ("step_5_perturb.py", ["{gh}", "--model", "resnet81"], "unknown model"),
    "step_6 quality 0": ("step_6_defend.py", ["{gh}", "--quality", "0"], "quality"),
    "step_6 quality 101": ("step_6_defend.py", ["{gh}", "--quality", "101"], "quality"),
    "step_6 unknown defense": ("step_6_defend.py", ["{gh}", "--defense", "prayer"], "unknown defense"),
    "step_6 median size": ("step_6_defend.py", ["{gh}", "--defense", "median", "--size", "4"], "--size"),
    "step_6 bits": ("step_6_defend.py", ["{gh}", "--defense", "bits", "--bits", "9"], "--bits"),
    "step_6 sigma": ("step_6_defend.py", ["{gh}", "--defense", "blur", "--sigma", "0"], "--sigma"),
    "step_6 scale": ("step_6_defend.py", ["{gh}", "--defense", "resize", "--scale", "2"], "--scale"),
    "step_6 bomb": ("step_6_defend.py", ["{in}/bomb.png"], "decompression bomb"),
    "step_7 unknown defense": ("step_7_break_defense.py", ["{gh}", "--defense", "prayer"], "unknown defense"),
    "step_7 eot 0": ("step_7_break_defense.py", ["{gh}", "--eot", "0"], "--eot"),
    "step_7 quality": ("step_7_break_defense.py", ["{gh}", "--quality", "500"], "quality"),
    "step_7 target": ("step_7_break_defense.py", ["{gh}", "--target", "unicorn"], "unknown class name"),
}


# one case of each program whose bad input no other test runs in a fresh process (step 2's: below and test_models).
# All are e2e (tests/conftest.py); steps 3 and 6 have no other smoke run, so theirs stay in make test-fast, while
# steps 5 and 7 have theirs (tests/test_attacks.py) and their cases run in process above.
FROM_THE_SHELL = (pytest.param("step_3 pickle", marks=pytest.mark.smoke), "step_5 epsilon text",
                  pytest.param("step_6 bomb", marks=pytest.mark.smoke), "step_7 eot 0")


def check_bad_input(run, name, files, tmp_path):
    script, args, message = CASES[name]
    out = tmp_path / "out"
    args = [arg.format(**{"in": files, "gh": GRACE_HOPPER, "out": out}) for arg in args]
    if script != "step_2_pretrained.py":
        args += ["--output-dir", out] if script in ("step_5_perturb.py", "step_7_break_defense.py") else []
        args += ["--output", out / "result.jpg"] if script == "step_6_defend.py" and "--defense" not in args else []
    args += [] if "--model" in args else ["--model", OFFLINE]
    result = run(script, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert not out.exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, files, tmp_path):
    check_bad_input(run_in_process, name, files, tmp_path)


@pytest.mark.parametrize("name", FROM_THE_SHELL)
def test_bad_input_from_the_shell(name, files, tmp_path):
    """The same, as a user meets it: a fresh process, its `__main__` and the interpreter's own exit."""
    check_bad_input(run_script, name, files, tmp_path)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16"])
def test_unusual_image_modes_work_in_step_2(mode, tmp_path):
    image = Image.open(GRACE_HOPPER)
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257))
    else:
        image = image.convert(mode)
    image.save(tmp_path / "photo.png")
    result = run_in_process("step_2_pretrained.py", tmp_path / "photo.png", "--model", OFFLINE, "--top-k", "1",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Prediction: ")


def test_a_corrupt_cached_weights_file_is_one_line_not_a_traceback(tmp_path):
    """A half-downloaded resnet18-f37072fd.pth in the torch cache: torch.load's UnpicklingError named in one line."""
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet18-f37072fd.pth").write_bytes(b"not a checkpoint, cut short")
    result = subprocess.run([sys.executable, str(REPO / "step_2_pretrained.py"), str(GRACE_HOPPER)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "TORCH_HOME": str(tmp_path / "torch")})
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot load the ImageNet weights of resnet18" in result.stderr


def test_a_library_error_names_the_parameter_and_a_command_line_its_flag(capsys):
    """The library's message names its parameter (it is called from Python too); utils.cli.run writes the flag that
    sets it, read from the parser, and leaves a name no flag sets as it is."""
    import argparse

    from utils.cli import UsageError, run

    parser = argparse.ArgumentParser(prog="prog")
    parser.add_argument("--input-size", type=int)

    def main(args):
        raise UsageError("`input_size` 7: `norm` too; `input_size` again", "input_size", "norm")

    with pytest.raises(SystemExit) as exit_:
        run(main, parser, [])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "prog: error: --input-size 7: norm too; --input-size again\n"
    assert str(UsageError("`input_size` 7", "input_size")) == "input_size 7"
