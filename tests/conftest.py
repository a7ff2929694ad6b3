"""Shared fixtures: a tiny model for fast unit tests, the offline real model, the test photos, and running scripts."""
import contextlib
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utils.models import Classifier, freeze, load_model, Preprocessing

# One torch thread, in the tests' own process and in the programs they start, unless OMP_NUM_THREADS says otherwise:
# on the 2-core machine the tests run on, shared with other work, two threads on these models wait on each other at
# every operation. Measured back to back while another process kept a core busy: test_app.py and test_speed.py's
# in-process tests 70 and 113 s on two threads, 16 and 19 s on one; step 5's smoke run (apgd on a sample photo) 10 and
# 16 s against 6 s. A program's --threads, or a test's own setting, still wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from utils import speed  # noqa: E402
speed.keep_freed_memory()  # as every command line does (utils.cli.run): the in-process tests run as the scripts do

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
CORGI = Path(os.environ.get("TNN_CORGI", REPO.parent / "shared" / "assets" / "corgi.png"))
RESNET18_WEIGHTS = Path(torch.hub.get_dir()) / "checkpoints" / "resnet18-f37072fd.pth"
OFFLINE = "efficientnet_lite0"


def run_script(script, *args, cwd):
    """Run a step script as a user would: a fresh process, in `cwd`, returning the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def run_tool(module, *args, cwd):
    """Run a program of tools/ as a user would from anywhere: `python -m tools.NAME`, with the repository on
    PYTHONPATH (from its root, `python -m` finds it by itself)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env)


def run_main(module, *args):
    """Run a program's command line in this process, as `python PROGRAM ARGS` would (its own parser and
    utils.cli.run: a UsageError is one line on stderr and exit status 2), without a fresh interpreter's seconds of
    start-up. Returns what run_script's CompletedProcess holds: returncode, stdout and stderr. The torch thread count
    a --threads sets is put back afterwards."""
    from utils.cli import run
    out, err, threads, status = io.StringIO(), io.StringIO(), torch.get_num_threads(), None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run(module.main, module.get_args_parser(), [str(arg) for arg in args])
    except SystemExit as exit_:  # run() always exits
        status = exit_.code or 0
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(returncode=status, stdout=out.getvalue(), stderr=err.getvalue())


def run_in_process(script, *args, cwd):
    """run_script's call, in this process: `script`'s command line by run_main, from the folder `cwd`. For the
    tables of bad inputs, dozens of runs that each stop at a check: a fresh interpreter would spend 5 to 7 s of Python,
    torch and torchvision on each before its one line (tests/test_bad_input.py's test_bad_input_from_the_shell runs
    one of each program's as a user would)."""
    module = importlib.import_module(Path(script).stem)
    with contextlib.chdir(cwd):
        return run_main(module, *args)


class TinyNet(nn.Module):
    """A small convolutional classifier with random weights over the 1000 ImageNet classes: milliseconds per step."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Linear(64, 1000)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def make_tiny_model(seed=0):
    torch.manual_seed(seed)
    return freeze(Classifier(TinyNet(), Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "tiny"))


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture
def tiny_images():
    """Four random 32x32 8-bit photos as a float batch on whole levels."""
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, size=(4, 3, 32, 32))
    return torch.from_numpy(levels).float() / 255


@pytest.fixture(scope="session")
def tiny_program(tmp_path_factory):
    """The tiny model exported as a .pt2 model file (with its classes file beside it), which any script takes as
    --model: a real model file that loads in a tenth of a second."""
    from utils.models import export_program, normalized
    model = make_tiny_model()
    path = tmp_path_factory.mktemp("tiny_program") / "tiny.pt2"
    export_program(normalized(model), path, model.classes, model.preprocessing.crop_size)
    return path


@pytest.fixture(scope="session")
def offline_model():
    return load_model(OFFLINE, "cpu")


@pytest.fixture
def grace_hopper():
    assert GRACE_HOPPER.is_file(), f"matplotlib should ship {GRACE_HOPPER}"
    return GRACE_HOPPER


@pytest.fixture
def corgi():
    if not CORGI.is_file():
        pytest.skip(f"the tutorial's corgi is not at {CORGI} (set TNN_CORGI to its path)")
    return CORGI


@pytest.fixture
def resnet18_weights():
    if not RESNET18_WEIGHTS.is_file():
        pytest.skip(f"ResNet18's ImageNet weights are not in the torch cache ({RESNET18_WEIGHTS}); no network here")
    return RESNET18_WEIGHTS


@pytest.fixture(scope="session")
def digits_setup(tmp_path_factory):
    """Four real digits in an ImageFolder, and a small MLP trained on a few hundred digits for a few seconds,
    exported as a .pt2 with its classes file (step 10's tests and the benchmarks' share it: made once)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from utils.models import export_program
    from utils.samples import digit_image
    root = tmp_path_factory.mktemp("certify")
    digits = load_digits()
    images = np.stack([digit_image(image) for image in digits.images[:400]])
    for index in (400, 401, 402, 403):
        folder = root / "digits" / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit_image(digits.images[index])).save(folder / f"{index}.png")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Linear(16, 10))
    model = Classifier(net, Preprocessing(32, (0.3,) * 3, (0.4,) * 3), memory_format=torch.contiguous_format)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    targets = torch.from_numpy(digits.target[:400])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(pixels), targets).backward()
        optimizer.step()
    export_program(model, root / "mlp.pt2", [str(k) for k in range(10)], pixels.shape[-1])
    return root


# ---- the fast lane ------------------------------------------------------------------------------------------------

# a call, or the function handed on to a helper that calls it (check_bad_input(run_script, ...))
STARTS_A_PROGRAM = ("run_script(", "run_script,", "run_tool(", "run_tool,", "subprocess.")


def pytest_collection_modifyitems(items):
    """Mark `e2e` every test whose own code starts a program in a fresh process (each start costs seconds: Python,
    torch and a model load), so that make test-fast can leave them out but for the `smoke` ones, one per program."""
    import inspect
    for item in items:
        function = getattr(item, "function", None)
        try:
            source = inspect.getsource(function) if function else ""
        except (OSError, TypeError):
            continue
        if any(call in source for call in STARTS_A_PROGRAM):
            item.add_marker(pytest.mark.e2e)
