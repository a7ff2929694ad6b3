"""`make demo` (demo.py) tells the story from the shell, online (tested against a local HTTP server and stand-in
ResNet18 weights) and offline, and the README generator keeps only real output."""
import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from utils.models import load_torchvision
from tests.conftest import CORGI, GRACE_HOPPER, REPO, run_in_process, run_script, run_tool
import demo
from utils.cli import UsageError, flag_of
from step_2_pretrained import get_args_parser
from utils.files import display_path
from tools.make_readme import without_progress_bars

TUTORIAL_R = CORGI.parent / "tutorial_adversarial_r.npy"
RESNET18_STD = (0.229, 0.224, 0.225)


def test_demo_tells_the_whole_story(tmp_path):
    result = run_script("demo.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    offline = [index for index, line in enumerate(out) if line.startswith("Running the same steps offline")]
    if offline:  # first the reasons: which address failed and why, or why ResNet18 could not load
        assert offline[0] >= 1 and "efficientnet_lite0" in out[offline[0]]
        assert all(line.startswith(("Download failed: ", "ResNet18 unavailable: ")) for line in out[:offline[0]])
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


class StepsInProcess:
    """Stands in for demo.py's subprocess module: runs each step's command line in this process (conftest's
    run_in_process) and prints what it printed, as the step's own process would on the terminal."""

    def __init__(self):
        self.commands = []

    def run(self, command):
        assert command[0] == sys.executable and Path(command[1]).parent == REPO, command
        self.commands.append([Path(command[1]).name, *command[2:]])
        result = run_in_process(command[1], *command[2:], cwd=Path.cwd())
        print(result.stdout, end="")
        return SimpleNamespace(returncode=result.returncode)


def test_demo_tells_the_offline_story_in_process(tmp_path, monkeypatch, capsys):
    """demo.py's main with its steps run in this process (its fresh-process run, which starts four more, is
    test_demo_tells_the_whole_story): the download that cannot work says why, then the offline story on
    EfficientNet-Lite0 and the sample photo: step 5 reaches goldfish, judged on its PNG, and step 6's JPEG undoes it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TNN_CORGI_URL", "step2a.png")  # not a web address: fails at once, network or not
    steps = StepsInProcess()
    monkeypatch.setattr(demo, "subprocess", steps)
    demo.main()
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["Download failed: step2a.png: not a web address (unknown url type: 'step2a.png')",
                       "Running the same steps offline instead, with --model efficientnet_lite0 on "
                       "samples/grace_hopper.jpg"]
    model = ["--model", "efficientnet_lite0"]
    assert steps.commands == [["step_2_pretrained.py", "samples/grace_hopper.jpg", *model],
                              ["step_5_perturb.py", "samples/grace_hopper.jpg", *model],
                              ["step_3_adversarial.py", "samples/grace_hopper.jpg", *model],
                              ["step_6_defend.py", "outputs/adversarial.png", *model]]
    assert [line for line in out if line.startswith("$ ")] == [f"$ python {' '.join(command)}"
                                                               for command in steps.commands]
    assert "Prediction: military uniform" in out
    new_predictions = [line for line in out if line.startswith("New prediction: ")]
    assert new_predictions[:2] == ["New prediction: goldfish, Carassius auratus"] * 2, "step 5, then step 3's re-apply"
    assert new_predictions[-1] != "New prediction: goldfish, Carassius auratus", "JPEG should undo the attack"
    assert out[-1] == "Pictures: outputs/comparison.png (original | adversarial | perturbation magnified)"
    assert (tmp_path / "samples" / "grace_hopper.jpg").read_bytes() == GRACE_HOPPER.read_bytes()
    assert (tmp_path / "outputs" / "comparison.png").is_file() and (tmp_path / "outputs" / "adversarial.jpg").is_file()


# ---- the online branch, without the internet ------------------------------------------------------------------

@pytest.fixture
def tutorial_files():
    if not CORGI.is_file() or not TUTORIAL_R.is_file():
        pytest.skip(f"the tutorial's corgi and r are not at {CORGI} and {TUTORIAL_R} (set TNN_CORGI to the corgi's "
                    "path, with tutorial_adversarial_r.npy beside it)")
    return CORGI, TUTORIAL_R


@pytest.fixture
def server(tmp_path, tutorial_files):
    """A local web server holding the tutorial's two files, as step2a.png and adversarial_r.npy; other paths are 404."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copyfile(tutorial_files[0], site / "step2a.png")
    shutil.copyfile(tutorial_files[1], site / "adversarial_r.npy")
    handler = functools.partial(QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in_resnet18(tmp_path):
    """A torch home whose hub cache holds random ResNet18 weights under the real file name. torch.hub checks the hash
    in the name only when it downloads; a file already in the cache is loaded as it is, as the real one would be."""
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), checkpoints / "resnet18-f37072fd.pth")
    return tmp_path / "torch"


def test_online_branch_runs_the_tutorial_on_resnet18(tmp_path, server, stand_in_resnet18, tutorial_files):
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, TORCH_HOME=str(stand_in_resnet18), TNN_CORGI_URL=f"{server}/step2a.png",
               TNN_R_URL=f"{server}/adversarial_r.npy", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO / "demo.py")], cwd=work, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    out = result.stdout.splitlines()
    assert not [line for line in out if line.startswith(("Download failed", "Running the same steps offline"))], out
    commands = [line for line in out if line.startswith("$ ")]
    assert commands == [
        "$ python step_2_pretrained.py outputs/downloads/dog.png",
        "$ python step_3_adversarial.py outputs/downloads/dog.png --perturbation outputs/downloads/adversarial_r.npy "
        "--output outputs/tutorial_adversarial.png",
        "$ python step_5_perturb.py outputs/downloads/dog.png",
        "$ python step_6_defend.py outputs/adversarial.png",
    ]
    # every step ran to its end on resnet18 (what random weights predict means nothing, so it is not asserted)
    for line in ("Prediction: ", "Old prediction: ", "New prediction: ", "Target class: goldfish, Carassius auratus",
                 "Steps used: ", "Defense: jpeg (quality 75)"):
        assert any(printed.startswith(line) for printed in out), line
    outputs = work / "outputs"
    assert (outputs / "downloads" / "dog.png").read_bytes() == tutorial_files[0].read_bytes()
    assert (outputs / "downloads" / "adversarial_r.npy").read_bytes() == tutorial_files[1].read_bytes()
    for name in ("adversarial.png", "adversarial_r.npy", "comparison.png", "adversarial.jpg"):
        assert (outputs / name).is_file(), name

    # step 3's PNG is the corgi plus the tutorial's r times ResNet18's std, to the nearest level
    corgi = np.asarray(Image.open(tutorial_files[0]).convert("RGB"), dtype=np.float64)
    assert corgi.shape == (224, 224, 3), "the shared corgi is already the 224x224 crop"
    r = np.load(tutorial_files[1], allow_pickle=False)[0].transpose(1, 2, 0)
    expected = np.clip(corgi + r * np.array(RESNET18_STD) * 255, 0, 255)
    written = np.asarray(Image.open(outputs / "tutorial_adversarial.png"), dtype=np.float64)
    assert np.abs(written - expected).max() <= 1
    assert np.abs(written - corgi).max() >= 1, "the r should move some pixel by at least one level"


def test_http_error_is_reported_as_such_not_as_no_network(tmp_path, server, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TNN_CORGI_URL", f"{server}/dog.jpg")
    assert demo.online_inputs() is None
    out = capsys.readouterr().out
    assert f"Download failed: {server}/dog.jpg: the address answered HTTP 404 File not found" in out
    assert "no network" not in out.lower()
    assert not (tmp_path / "outputs" / "downloads" / "dog.png").exists()




def test_resnet18_unavailable_names_the_steps_flag(monkeypatch, capsys):
    """The library's advice names its parameter (model); the demo runs the steps, so it says their --model."""
    monkeypatch.setattr(demo, "download_first", lambda urls, path, check: path)

    def unavailable(name):
        raise UsageError("no weights: use `model` efficientnet_lite0, which needs no network", "model")
    monkeypatch.setattr(demo, "load_model", unavailable)
    assert demo.online_inputs() is None
    assert capsys.readouterr().out == "ResNet18 unavailable: no weights: use --model efficientnet_lite0, which needs " \
                                      "no network\n"
@pytest.mark.parametrize("address, why", [
    ("http://tnn-no-such-host.invalid/step2a.png", "no network (the name tnn-no-such-host.invalid does not resolve)"),
    ("step2a.png", "not a web address (unknown url type: 'step2a.png')"),
])
def test_an_address_that_cannot_be_reached_says_why(tmp_path, monkeypatch, capsys, address, why):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TNN_CORGI_URL", address)
    assert demo.online_inputs() is None
    assert capsys.readouterr().out == f"Download failed: {address}: {why}\n"


def test_r_falls_back_to_the_companion_copy_and_bad_files_are_refused(tmp_path, server, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TNN_CORGI_URL", f"{server}/step2a.png")
    monkeypatch.delenv("TNN_R_URL", raising=False)
    monkeypatch.setattr(demo, "TUTORIAL_R_URLS", (f"{server}/outputs/adversarial_r.npy", f"{server}/step2a.png",
                                                  f"{server}/adversarial_r.npy"))
    monkeypatch.setattr(demo, "load_model", lambda name: name)  # ResNet18's weights are another test's business
    photo, r = demo.online_inputs()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Download failed: {server}/outputs/adversarial_r.npy: the address answered HTTP 404 File not found"
    assert out[1].startswith(f"Download failed: {server}/step2a.png: the file it sent is not usable: ")
    assert len(out) == 2
    assert r.read_bytes() == TUTORIAL_R.read_bytes() and photo.read_bytes() == CORGI.read_bytes()


# ---- no machine paths in what the scripts print ----------------------------------------------------------------

def test_paths_are_shown_relative_to_the_working_folder_or_under_home(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert display_path(tmp_path / "work" / "samples" / "a.png") == "samples/a.png"
    assert display_path(tmp_path / "home" / ".cache" / "x.pth") == "~/.cache/x.pth"
    assert display_path("outputs/adversarial.png") == "outputs/adversarial.png"  # as the user typed it
    assert display_path("/elsewhere/x.png") == "/elsewhere/x.png"


@pytest.mark.smoke
def test_sample_photos_are_listed_relative_to_the_working_folder(tmp_path):
    site_packages = Path(matplotlib.__file__).resolve().parent.parent  # run from there: the photos are below it
    result = run_tool("tools.sample_images", "--output-dir", tmp_path, cwd=site_packages)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("matplotlib/mpl-data/sample_data/grace_hopper.jpg -> "), first


def test_missing_weights_name_the_torch_cache_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / ".cache" / "torch"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(torchvision.models, "get_model", no_network)
    with pytest.raises(UsageError) as error:
        load_torchvision("resnet18")
    assert "to ~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth, or use model efficientnet_lite0" in str(error.value)
    assert "or use --model efficientnet_lite0" in error.value.describe(flag_of(get_args_parser())), "the steps' words"
    assert str(tmp_path) not in str(error.value)


@pytest.mark.parametrize("text, kept", [
    ("result 1\ntiming:  50%|#####     | 1/2 [00:01<00:01]\r   \nresult 2", "result 1\nresult 2"),
    ("no bars here\nline two", "no bars here\nline two"),
    ("table\n" + " " * 70 + "\x1b[A\n" + " " * 71 + "\x1b[A", "table"),  # a nested bar's cursor moves, left behind
])
def test_readme_generator_drops_progress_bars_only(text, kept):
    assert without_progress_bars(text) == kept
