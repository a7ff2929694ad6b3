"""Our robust accuracy and its cost beside the reference AutoAttack's, on the same images and model, in one run.

    python bench/robust_accuracy.py [--model outputs/robust-demo/adversarial.pt2] [--folder digits/test]
                                    [--epsilon 32] [--threads 1]

Ours: step 8 as a user runs it (a fresh process: its start-up counts against us), its default ensemble (apgd, apgd-t,
square; AutoAttack's flow, early stop, on the 8-bit lattice, no FAB), judged on the PNGs it writes. The reference:
pyautoattack's standard version (APGD-CE, APGD-T, FAB-T, Square) in this process, judged on its adversarial images
rounded to 8 bits. Both on the same folder (an ImageFolder with true labels), model and epsilon; wall time of each.
The target: ours at most the reference's robust accuracy, in at most half its time. `make robust-demo` makes the
default model and folder.
"""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from step_2_pretrained import load_model, prepare_image, to_tensor  # noqa: E402
from utils.flags import add_benchmark_arguments  # noqa: E402
from utils.cli import ArgumentParser, UsageError, run  # noqa: E402
from utils.data import list_photos  # noqa: E402
from utils.evaluation.reference import reference_autoattack, worst_case_robust  # noqa: E402


def run_ours(args, out):
    """Step 8's ensemble in a fresh process: (robust images, images, wall seconds)."""
    command = [sys.executable, str(ROOT / "step_8_evaluate.py"), args.folder, "--model", args.model, "--epsilons",
               f"{args.epsilon:g}", "--threads", str(args.threads), "--output-dir", str(out)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise UsageError(f"step 8 failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    return (*worst_case_robust(out, args.epsilon), seconds)


def run_reference(args):
    """The reference AutoAttack on the same 8-bit images: (robust images, images, wall seconds)."""
    model = load_model(args.model)
    paths, names = list_photos(args.folder)
    if not all("/" in name for name in names):
        raise UsageError(f"{args.folder}: needs true labels, an ImageFolder tree (one subfolder per class)")
    images = to_tensor([prepare_image(path, model) for path in paths])
    labels = torch.tensor([model.classes.index(name.split("/")[0]) for name in names])
    started = time.perf_counter()
    robust, _ = reference_autoattack(model, images, labels, args.epsilon)
    return robust, len(paths), time.perf_counter() - started


def main(args):
    if not Path(args.model).is_file():
        raise UsageError(f"{args.model}: no such model (make robust-demo trains it)")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        ours, images, our_seconds = run_ours(args, Path(out))
    reference, _, reference_seconds = run_reference(args)
    print(f"{images} images of {args.folder}, model {Path(args.model).name}, epsilon {args.epsilon:g} levels, "
          f"{args.threads} thread(s):")
    print(f"  ours (apgd, apgd-t, square):       robust accuracy {ours / images:6.1%} ({ours}), {our_seconds:7.1f} s")
    print(f"  reference AutoAttack (standard):   robust accuracy {reference / images:6.1%} ({reference}), "
          f"{reference_seconds:7.1f} s")
    print(f"  ours / reference: robust accuracy {ours - reference:+d} images, time x{our_seconds / reference_seconds:.2f} "
          f"(target: at most +0 images, x0.5)")


def get_args_parser():
    parser = ArgumentParser(description="Robust accuracy and wall time: step 8's ensemble against the reference AutoAttack.")
    add_benchmark_arguments(parser, model="outputs/robust-demo/adversarial.pt2", epsilon=32)
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
