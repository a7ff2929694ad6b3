"""Each defense against a reference implementation on known inputs; BPDA; and the adaptive attack end to end."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from utils.models import predict_images, prepare_image
from utils.adaptive import DefenseBPDA
from tests.conftest import OFFLINE, run_script
from utils.cli import UsageError
from utils.defenses import DEFENSES, make_defense


@pytest.fixture
def photo(grace_hopper):
    return np.asarray(Image.open(grace_hopper).convert("RGB").resize((96, 80))).copy()


def test_jpeg_is_pil_encode_then_decode(photo):
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=40)
    reference = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    assert np.array_equal(make_defense("jpeg", quality=40)(photo), reference)
    assert not np.array_equal(make_defense("jpeg", quality=95)(photo), reference)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_bits_keeps_the_top_bits(photo, bits):
    assert np.array_equal(make_defense("bits", bits=bits)(photo), photo & (0xFF << (8 - bits) & 0xFF))


@pytest.mark.parametrize("size", [3, 5])
def test_median_matches_scipy_with_replicated_borders(photo, size):
    reference = ndimage.median_filter(photo, size=(size, size, 1), mode="nearest")
    assert np.array_equal(make_defense("median", size=size)(photo), reference)


def test_blur_matches_scipy_gaussian(photo):
    reference = ndimage.gaussian_filter(photo.astype(float), sigma=(1.5, 1.5, 0), mode="mirror", truncate=3.0)
    difference = np.abs(make_defense("blur", sigma=1.5)(photo).astype(float) - reference)
    # OpenCV's 8-bit path filters in fixed point and rounds: within 1.5 levels of the exact filter, 0.5 on average
    assert difference.max() <= 1.5 and difference.mean() <= 0.5


def test_resize_down_and_up_matches_pil_bilinear(photo):
    down = Image.fromarray(photo).resize((48, 40), Image.Resampling.BILINEAR)
    reference = np.asarray(down.resize((96, 80), Image.Resampling.BILINEAR))
    assert np.array_equal(make_defense("resize", scale=0.5)(photo), reference)
    assert np.array_equal(make_defense("resize", scale=1.0)(photo), photo)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_defenses_keep_shape_and_type_and_are_deterministic_under_a_seed(name, photo):
    first, second = make_defense(name, seed=3), make_defense(name, seed=3)
    outputs = [first(photo) for _ in range(3)]
    assert all(output.shape == photo.shape and output.dtype == np.uint8 for output in outputs)
    assert all(np.array_equal(a, b) for a, b in zip(outputs, [second(photo) for _ in range(3)]))


def test_random_defense_varies_per_call_and_per_seed(photo):
    defense = make_defense("random", seed=0)
    draws = [defense(photo) for _ in range(4)]
    assert any(not np.array_equal(draws[0], other) for other in draws[1:])
    assert not all(np.array_equal(a, make_defense("random", seed=1)(photo)) for a in draws[:1])


@pytest.mark.parametrize("name, parameters", [("jpeg", {"quality": 0}), ("jpeg", {"quality": 7.5}), ("bits", {"bits": 0}),
                                              ("median", {"size": 4}), ("blur", {"sigma": -1}), ("resize", {"scale": 0}),
                                              ("nope", {})])
def test_bad_parameters_are_usage_errors(name, parameters):
    with pytest.raises(UsageError) as error:
        make_defense(name, **parameters)
    assert "--" not in str(error.value), "the library names its parameter; steps 6 and 7 write the flag"


def test_bpda_is_the_defense_forward_and_the_identity_backward(photo):
    defense = make_defense("jpeg", quality=20)
    pixels = (torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255).requires_grad_(True)
    out = DefenseBPDA.apply(pixels, defense)
    expected = torch.from_numpy(defense(photo)).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(out.detach(), expected)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.equal(pixels.grad, weights)


# ---- end to end: the plain attack is undone by JPEG 75, the adaptive one survives it ----------------------------


def jpeg_verdicts(work, model):
    defense = make_defense("jpeg", quality=75)
    return [predict_images(model, [defense(prepare_image(work / name, model))])[0] for name in ("plain.png", "adaptive.png")]


def check_break(image, model, tmp_path):
    result = run_script("step_7_break_defense.py", image, "--model", OFFLINE, "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.splitlines()
    assert out[0] == "Target class: goldfish, Carassius auratus"
    assert "New prediction: goldfish, Carassius auratus" in out
    plain, adaptive = jpeg_verdicts(tmp_path / "out", model)
    assert plain != 1, "the plain attack should be undone by JPEG 75"
    assert adaptive == 1, "the adaptive attack should survive JPEG 75 (judged on the PNG read back, re-compressed)"
    linf = np.abs(np.asarray(Image.open(tmp_path / "out" / "adaptive.png"), dtype=int) - prepare_image(image, model).astype(int))
    assert linf.max() <= 10
    assert (tmp_path / "out" / "break_defense.png").stat().st_size > 0


@pytest.mark.slow
def test_adaptive_attack_survives_jpeg_on_grace_hopper(grace_hopper, offline_model, tmp_path):
    check_break(grace_hopper, offline_model, tmp_path)


@pytest.mark.slow
def test_adaptive_attack_survives_jpeg_on_the_corgi(corgi, offline_model, tmp_path):
    check_break(corgi, offline_model, tmp_path)


@pytest.mark.slow
def test_step6_report_says_whether_the_clean_prediction_survives(grace_hopper, tmp_path):
    result = run_script("step_6_defend.py", grace_hopper, "--model", OFFLINE, "--report", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "military uniform -> military uniform after the defense (kept)" in result.stdout


@pytest.mark.parametrize("defense, options, suffix, name", [
    ("jpeg", ["--quality", "40"], ".jpg", "jpeg (quality 40)"),
    ("median", ["--size", "5"], ".png", "median (size 5)"),
], ids=["jpeg", "median"])
def test_step6_writes_the_defended_file_and_predicts_on_it_read_back(defense, options, suffix, name, tiny_program,
                                                                     tmp_path, capsys):
    """Step 6 in process on the tiny model file: the file it writes is the defense's output (the JPEG's very bytes; the
    median filter's pixels in a lossless PNG), and its New prediction is the model's on that file read back."""
    import step_6_defend
    from utils.defenses import jpeg_bytes
    from utils.models import get_label, load_model
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(photo)
    output = tmp_path / f"defended{suffix}"
    step_6_defend.main(step_6_defend.get_args_parser().parse_args(
        [str(photo), "--model", str(tiny_program), "--defense", defense, *options, "--output", str(output),
         "--report", "--device", "cpu"]))
    model = load_model(str(tiny_program))
    image = prepare_image(photo, model)
    with Image.open(output) as written:
        assert written.format == ("JPEG" if defense == "jpeg" else "PNG") and written.size == (32, 32)
    if defense == "jpeg":
        assert output.read_bytes() == jpeg_bytes(image, quality=40)
    else:
        assert np.array_equal(np.asarray(Image.open(output).convert("RGB")), make_defense("median", size=5)(image))
    before, after = predict_images(model, [image, prepare_image(output, model)])
    defended = predict_images(model, [make_defense(defense, **{options[0][2:]: float(options[1])})(image)])[0]
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"Old prediction: {get_label(before, model.classes)}",
                     f"New prediction: {get_label(after, model.classes)}",
                     f"Defense: {name}, applied to the image and written to {output}",
                     f"Figure: {tmp_path / 'defense.png'}",
                     f"Clean photo {photo}: {get_label(before, model.classes)} -> "
                     f"{get_label(defended, model.classes)} after the defense "
                     f"({'kept' if defended == before else 'LOST'})"]


def test_step6_refuses_an_output_the_defense_cannot_write(tmp_path):
    import step_6_defend
    args = step_6_defend.get_args_parser().parse_args(["photo.png", "--defense", "median", "--output",
                                                       str(tmp_path / "defended.jpg")])
    with pytest.raises(UsageError, match="must end in .png"):
        step_6_defend.main(args)
    assert not list(tmp_path.iterdir())
