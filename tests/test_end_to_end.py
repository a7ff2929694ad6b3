"""The tutorial's story, run as a user runs it (subprocesses), judged on the files written to disk and read back."""
import numpy as np
import pytest
from PIL import Image

from utils.models import find_class, load_model, predict_images, prepare_image
from tests.conftest import OFFLINE, run_script
from utils.defenses import jpeg
from utils.files import temp_beside

pytestmark = pytest.mark.slow  # end to end, several processes: make test-fast leaves it out

GOLDFISH = "goldfish, Carassius auratus"
PEMBROKE = "Pembroke, Pembroke Welsh corgi"


def lines(result):
    assert result.returncode in (0, 1), result.stderr
    return result.stdout.splitlines()


def classify_file(path, model):
    return predict_images(model, [prepare_image(path, model)])[0]


def linf(path, original):
    return int(np.abs(np.asarray(Image.open(path).convert("RGB"), dtype=int) - original.astype(int)).max())


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """Steps 5, 3 and 6 on grace_hopper with the offline model and the defaults (the README's offline demo)."""
    from tests.conftest import GRACE_HOPPER
    work = tmp_path_factory.mktemp("story")
    killed_writes = [temp_beside(work / "outputs" / name) for name in
                     ("adversarial.png", "adversarial_r.npy", "comparison.png", "step3.png", "adversarial.jpg")]
    step5 = run_script("step_5_perturb.py", GRACE_HOPPER, "--model", OFFLINE, cwd=work)
    step3 = run_script("step_3_adversarial.py", GRACE_HOPPER, "--model", OFFLINE, "--output", "outputs/step3.png", cwd=work)
    step6 = run_script("step_6_defend.py", "outputs/adversarial.png", "--model", OFFLINE, "--quality", "75", cwd=work)
    assert not any(path.exists() for path in killed_writes), "the temp files of killed writes of these outputs go"
    return work, step5, step3, step6


def test_step2_prints_the_prediction_first(grace_hopper, tmp_path):
    result = run_script("step_2_pretrained.py", grace_hopper, "--model", OFFLINE, "--top-k", "3", cwd=tmp_path)
    out = lines(result)
    assert result.returncode == 0 and out[0] == "Prediction: military uniform"
    assert len(out) == 4 and "military uniform (652)" in out[1]


def test_step5_reaches_goldfish_with_the_defaults(story, grace_hopper, offline_model):
    work, step5, _, _ = story
    out = lines(step5)
    assert step5.returncode == 0, step5.stdout
    assert out[0] == f"Target class: {GOLDFISH}"
    assert out[1].startswith("Loss: ") and " / Class: " in out[1]
    assert f"Old prediction: military uniform" in out and f"New prediction: {GOLDFISH}" in out
    saved = work / "outputs" / "adversarial.png"
    assert classify_file(saved, offline_model) == 1
    assert linf(saved, prepare_image(grace_hopper, offline_model)) <= 10
    for name in ("adversarial_r.npy", "comparison.png"):
        assert (work / "outputs" / name).stat().st_size > 0
    r = np.load(work / "outputs" / "adversarial_r.npy", allow_pickle=False)
    assert r.dtype == np.float32 and r.shape == (1, 3, 224, 224)


def test_step3_reapplies_step5s_r(story, offline_model):
    work, _, step3, _ = story
    assert step3.returncode == 0, step3.stderr
    assert lines(step3) == ["Old prediction: military uniform", f"New prediction: {GOLDFISH}"]
    assert classify_file(work / "outputs" / "step3.png", offline_model) == 1
    assert (work / "outputs" / "step3.png").read_bytes() == (work / "outputs" / "adversarial.png").read_bytes()


def test_step6_jpeg_undoes_the_attack(story, offline_model):
    work, _, _, step6 = story
    assert step6.returncode == 0, step6.stderr
    out = lines(step6)
    assert out[0] == f"Old prediction: {GOLDFISH}"
    assert out[1].startswith("New prediction: ") and out[1] != f"New prediction: {GOLDFISH}"
    jpeg_file = work / "outputs" / "adversarial.jpg"
    assert jpeg_file.read_bytes()[:2] == b"\xff\xd8"
    assert classify_file(jpeg_file, offline_model) != 1


def test_same_seed_same_bytes(grace_hopper, tmp_path):
    outputs = []
    for run in ("a", "b"):
        args = [grace_hopper, "--model", OFFLINE, "--method", "pgd", "--random-start", "--seed", "5", "--steps", "4",
                "--no-early-stop", "--output-dir", run]
        assert run_script("step_5_perturb.py", *args, cwd=tmp_path).returncode in (0, 1)
        outputs.append([(tmp_path / run / name).read_bytes() for name in ("adversarial.png", "adversarial_r.npy")])
    assert outputs[0] == outputs[1]


def test_step5_says_so_and_exits_1_when_the_attack_fails(grace_hopper, offline_model, tmp_path):
    result = run_script("step_5_perturb.py", grace_hopper, "--model", OFFLINE, "--method", "fgsm", "--epsilon", "1",
                        cwd=tmp_path)
    assert result.returncode == 1
    assert "did not get there" in result.stdout
    assert classify_file(tmp_path / "outputs" / "adversarial.png", offline_model) != 1


def test_step5_on_a_folder_writes_one_png_per_image(grace_hopper, offline_model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    image = Image.open(grace_hopper)
    image.save(folder / "hopper.png")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "mirror.jpg")
    result = run_script("step_5_perturb.py", folder, "--model", OFFLINE, "--method", "pgd", "--batch-size", "2",
                        "--target", "tench", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Fooled 2 of 2" in result.stdout
    for name in ("hopper", "mirror"):
        original = prepare_image(next(folder.glob(f"{name}.*")), offline_model)
        assert classify_file(tmp_path / "out" / f"{name}.png", offline_model) == find_class("tench")
        assert linf(tmp_path / "out" / f"{name}.png", original) <= 10


def test_untargeted_attack_leaves_the_clean_class(grace_hopper, offline_model, tmp_path):
    result = run_script("step_5_perturb.py", grace_hopper, "--model", OFFLINE, "--method", "pgd", "--untargeted",
                        "--epsilon", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert lines(result)[0] == "Untargeted: any class but military uniform"
    assert classify_file(tmp_path / "outputs" / "adversarial.png", offline_model) != find_class("military uniform")


# ---- the tutorial's corgi --------------------------------------------------------------------------------------


def test_corgi_story_offline(corgi, offline_model, tmp_path):
    step2 = run_script("step_2_pretrained.py", corgi, "--model", OFFLINE, cwd=tmp_path)
    assert lines(step2)[0] == f"Prediction: {PEMBROKE}"
    step5 = run_script("step_5_perturb.py", corgi, "--model", OFFLINE, cwd=tmp_path)
    assert step5.returncode == 0 and f"New prediction: {GOLDFISH}" in lines(step5)
    saved = tmp_path / "outputs" / "adversarial.png"
    assert classify_file(saved, offline_model) == 1
    assert linf(saved, prepare_image(corgi, offline_model)) <= 10
    step6 = run_script("step_6_defend.py", saved, "--model", OFFLINE, cwd=tmp_path)
    assert lines(step6)[:2] == [f"Old prediction: {GOLDFISH}", f"New prediction: {PEMBROKE}"]
    assert classify_file(tmp_path / "outputs" / "adversarial.jpg", offline_model) == 263


def test_corgi_story_on_resnet18(corgi, resnet18_weights, tmp_path):
    model = load_model("resnet18")
    assert lines(run_script("step_2_pretrained.py", corgi, cwd=tmp_path))[0] == f"Prediction: {PEMBROKE}"
    step5 = run_script("step_5_perturb.py", corgi, cwd=tmp_path)
    assert step5.returncode == 0 and f"New prediction: {GOLDFISH}" in lines(step5)
    assert classify_file(tmp_path / "outputs" / "adversarial.png", model) == 1
    step6 = run_script("step_6_defend.py", "outputs/adversarial.png", cwd=tmp_path)
    assert lines(step6)[1] == f"New prediction: {PEMBROKE}"
    assert predict_images(model, [jpeg(prepare_image(tmp_path / "outputs" / "adversarial.png", model), 75)])[0] == 263
