"""How much does this project's PGD cost per step, next to the model itself and next to torchattacks?

    python bench/attack_speed.py [--models resnet18,efficientnet_lite0] [--batch-sizes 1,16] [--device auto|cpu|cuda]
                                 [--steps 10] [--epsilon 8] [--alpha LEVELS] [--repeats 3] [--threads N] [--stat median|min]

For each model and batch size, on the same device and the same images, it times per gradient step:
- fwd+bwd: the model's forward, a cross-entropy and the backward to the input (weights frozen), `steps` times:
  the floor for any gradient attack;
- ours: utils.attacks PGD, targeted, early stop off, no random start;
- torchattacks: torchattacks.PGD with the same eps, step size, steps and no random start, targeted by label.
Each is warmed up, then timed `--repeats` times (interleaved, so a busy machine slows all three alike) and the
min (or, with --stat median, the median) is kept. Success is judged the same way for both attacks: the returned image rounded to 8 bits
(ours already is) classified as the target, goldfish (1).

Ours runs `steps + 1` forwards (the last one judges the final 8-bit image) and `steps` backwards, so even a free
loop costs about 1 + fwd / (steps * fwd+bwd) times fwd+bwd; the "fwd" column and "ours/floor" show that share.
The issue's targets: ours <= 1.05 x fwd+bwd, and ours <= torchattacks.
"""
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from step_2_pretrained import (OFFLINE_MODEL, freeze, get_device, load_model, load_torchvision,  # noqa: E402
                               predict, prepare_image, to_tensor, torchvision_classifiers)
from utils.attacks import make_attack  # noqa: E402
from utils.cli import ArgumentParser, UsageError, comma_list, number_in, run  # noqa: E402

TARGET = 1  # goldfish
TARGET_RATIO_FLOOR = 1.05
RANDOM_WEIGHTS = ("resnet18",)  # timed with random weights: no network here, and the timing does not depend on them


def photo_paths():
    """The offline photos: matplotlib's Grace Hopper and five of scikit-image's samples (found without importing it)."""
    skimage_data = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
    return [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"] + [skimage_data / n for n in names]


def get_model(name, device):
    if name in RANDOM_WEIGHTS:
        torch.manual_seed(0)
        return freeze(load_torchvision(name, pretrained=False)).to(device)
    return load_model(name, device)


def get_batch(model, batch_size, device):
    """`batch_size` photos (the offline ones, repeated) as a float batch on whole levels, and the target labels."""
    images = [prepare_image(path, model) for path in photo_paths()]
    images = [images[i % len(images)] for i in range(batch_size)]
    return to_tensor(images, device), torch.full((batch_size,), TARGET, device=device)


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device):
    """(seconds, result) of function(), with the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


# ---- the three things timed -----------------------------------------------------------------------------------

def forward_backward(model, images, labels, steps):
    """The floor: `steps` forwards, losses and backwards to the input."""
    for _ in range(steps):
        pixels = images.detach().requires_grad_(True)
        loss = F.cross_entropy(model(pixels), labels, reduction="sum")
        grad, = torch.autograd.grad(loss, pixels)
    return grad


@torch.no_grad()
def forward_only(model, images, labels, steps):
    """One forward without gradients: what judging the final image costs."""
    return model(images)


def ours(model, images, labels, steps, epsilon, alpha):
    attack = make_attack("pgd", model, epsilon=epsilon, steps=steps, alpha=alpha, targeted=True, early_stop=False,
                         random_start=False)
    return attack(images, labels).adversarial


def theirs(model, images, labels, steps, epsilon, alpha):
    import torchattacks
    attack = torchattacks.PGD(model, eps=epsilon / 255, alpha=alpha / 255, steps=steps, random_start=False)
    attack.set_mode_targeted_by_label(quiet=True)
    return attack(images, labels)


def success_rate(model, adversarial, labels):
    """Share of images whose 8-bit version is classified as the target."""
    levels = adversarial.detach().mul(255).round().clamp(0, 255).div(255)
    return (predict(model, levels).argmax(dim=1) == labels).float().mean().item()


# ---- one measurement ------------------------------------------------------------------------------------------

def measure(name, batch_size, device, args, progress):
    """Per-step seconds of fwd+bwd, ours and torchattacks (and one forward), plus both success rates."""
    model = get_model(name, device)
    images, labels = get_batch(model, batch_size, device)
    runs = {
        "fwd+bwd": lambda steps: forward_backward(model, images, labels, steps),
        "fwd": lambda steps: forward_only(model, images, labels, steps),
        "ours": lambda steps: ours(model, images, labels, steps, args.epsilon, args.alpha),
        "torchattacks": lambda steps: theirs(model, images, labels, steps, args.epsilon, args.alpha),
    }
    for function in runs.values():  # warm-up: allocator, oneDNN/cuDNN kernels, lazy imports
        function(min(2, args.steps))
    seconds = {key: [] for key in runs}
    outputs = {}
    for _ in range(args.repeats):
        for key, function in runs.items():
            elapsed, outputs[key] = timed(lambda: function(args.steps), device)
            seconds[key].append(elapsed / (1 if key == "fwd" else args.steps))
        progress.update(1)
    pick = statistics.median if args.stat == "median" else min
    row = {key: pick(values) for key, values in seconds.items()}
    row.update(model=name, batch=batch_size, random=name in RANDOM_WEIGHTS,
               ours_success=success_rate(model, outputs["ours"], labels),
               theirs_success=success_rate(model, outputs["torchattacks"], labels))
    return row


# ---- report ---------------------------------------------------------------------------------------------------

def print_header(args, device):
    import torchattacks
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else "cpu"
    print(f"device: {device} ({where}), torch {torch.__version__}, torchattacks {torchattacks.__version__}, "
          f"torch threads: {threads}, interop threads: {torch.get_num_interop_threads()}")
    print(f"targeted PGD to goldfish ({TARGET}): epsilon {args.epsilon:g} levels, alpha {args.alpha:g} levels, "
          f"{args.steps} steps, no random start, early stop off; {args.stat} of {args.repeats} repeats after a warm-up; "
          "times are per gradient step")


def print_table(rows, args):
    header = (f"{'model':<19} {'batch':>5} {'fwd+bwd ms':>10} {'fwd ms':>8} {'ours ms':>9} {'tattacks ms':>11} "
              f"{'ours/fb':>8} {'ours/ta':>8} {'ours/floor':>10} {'succ ours':>9} {'succ ta':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        star = "*" if row["random"] else " "
        floor = row["fwd+bwd"] + row["fwd"] / args.steps
        print(f"{row['model'] + star:<19} {row['batch']:>5} {1000 * row['fwd+bwd']:>10.1f} {1000 * row['fwd']:>8.1f} "
              f"{1000 * row['ours']:>9.1f} {1000 * row['torchattacks']:>11.1f} "
              f"{row['ours'] / row['fwd+bwd']:>8.3f} {row['ours'] / row['torchattacks']:>8.3f} {row['ours'] / floor:>10.3f} "
              f"{row['ours_success']:>9.0%} {row['theirs_success']:>8.0%}")
    print(f"fwd ms: one forward without gradients (per call, not per step). ours/floor: ours / (fwd+bwd + fwd / {args.steps}),"
          f" since ours also judges its final image with one more forward, which fwd+bwd and torchattacks do not.")
    if any(row["random"] for row in rows):
        print("* random weights (no network to fetch ImageNet ones): timing only, its success rates say nothing about "
              "attacking an ImageNet classifier")
    for row in rows:
        ratio, versus = row["ours"] / row["fwd+bwd"], row["ours"] / row["torchattacks"]
        print(f"{row['model']} batch {row['batch']}: ours/fwd+bwd {ratio:.3f} ({'meets' if ratio <= TARGET_RATIO_FLOOR else 'misses'} "
              f"<= {TARGET_RATIO_FLOOR}), ours/torchattacks {versus:.3f} ({'meets' if versus <= 1 else 'misses'} <= 1)")


def main(args):
    device = get_device(args.device)
    unknown = [name for name in args.models if name != OFFLINE_MODEL and name not in torchvision_classifiers()]
    if unknown:
        raise UsageError(f"unknown model {unknown[0]!r}; try resnet18 or {OFFLINE_MODEL}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.alpha is None:
        args.alpha = 2.5 * args.epsilon / args.steps  # the project's PGD default, passed to both attacks
    print_header(args, device)
    from tqdm import tqdm
    rows = []
    with tqdm(total=len(args.models) * len(args.batch_sizes) * args.repeats, desc="timing", unit="repeat",
              file=sys.stderr, leave=False) as progress:
        for name in args.models:
            for batch_size in args.batch_sizes:
                progress.set_postfix_str(f"{name} batch {batch_size}")
                rows.append(measure(name, batch_size, device, args, progress))
    print_table(rows, args)
    if args.queries:
        bench_apgd_square(args, device)


def get_args_parser():
    parser = ArgumentParser(description="Time this project's targeted PGD per step against the model's forward+backward "
                                        "and torchattacks' PGD.")
    parser.add_argument("--models", type=comma_list(name="model"), default=["resnet18", OFFLINE_MODEL],
                        help="comma-separated; resnet18 gets random weights (default: resnet18,efficientnet_lite0)")
    parser.add_argument("--batch-sizes", type=comma_list(number_in(1, 4096, int, name="batch size"), name="batch size"),
                        default=[1, 16], help="comma-separated (default: 1,16)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--steps", type=number_in(1, 10000, int, name="--steps"), default=10,
                        help="gradient steps per attack (default: %(default)s)")
    parser.add_argument("--epsilon", type=number_in(0, 255, name="--epsilon"), default=8,
                        help="L-infinity budget in levels out of 255 (default: %(default)s)")
    parser.add_argument("--alpha", type=number_in(0, 255, name="--alpha", low_open=True), default=None,
                        help="step size in levels (default: the project's 2.5 * epsilon / steps)")
    parser.add_argument("--queries", type=number_in(0, 100000, int, name="--queries"), default=20,
                        help="Square queries per timing; APGD and Square are timed too unless 0 (default: %(default)s)")
    parser.add_argument("--repeats", type=number_in(1, 1000, int, name="--repeats"), default=3,
                        help="timed runs per measurement (default: %(default)s)")
    parser.add_argument("--threads", type=number_in(1, 1024, int, name="--threads"), default=None,
                        help="torch CPU threads (default: torch's own choice; on a shared machine 1 is steadier)")
    parser.add_argument("--stat", choices=["median", "min"], default="min",
                        help="how repeats are summarized; other processes only ever add time, so the min is the least "
                             "disturbed run (default: %(default)s)")
    return parser


# ---- APGD and Square (issue 7) --------------------------------------------------------------------------------
# Both untargeted against the clean prediction, early stop off (every image runs every step or query), on the same
# photos: APGD per gradient step next to fwd+bwd and torchattacks' APGD; Square per query next to one forward.
APGD_TARGET_RATIO = 1.05   # APGD step <= 1.05 x fwd+bwd
SQUARE_TARGET_RATIO = 1.1  # Square query <= 1.1 x forward


def apgd_ours(model, images, labels, steps, epsilon):
    attack = make_attack("apgd", model, epsilon=epsilon, steps=steps, targeted=False, early_stop=False)
    return attack(images, labels).adversarial


def apgd_theirs(model, images, labels, steps, epsilon):
    import torchattacks
    return torchattacks.APGD(model, eps=epsilon / 255, steps=steps, n_restarts=1, loss="ce")(images, labels)


def square_ours(model, images, labels, queries, epsilon):
    attack = make_attack("square", model, epsilon=epsilon, queries=queries, targeted=False, early_stop=False)
    return attack(images, labels).adversarial


def measure_apgd_square(name, batch_size, device, args, progress):
    """Seconds per APGD step (ours, torchattacks), per fwd+bwd, per Square query and per forward."""
    model = get_model(name, device)
    images, _ = get_batch(model, batch_size, device)
    with torch.no_grad():
        clean = model(images).argmax(dim=1)
    runs = {  # name: (function of the count, the count it is divided by)
        "fwd+bwd": (lambda count: forward_backward(model, images, clean, count), args.steps),
        "apgd": (lambda count: apgd_ours(model, images, clean, count, args.epsilon), args.steps),
        "ta apgd": (lambda count: apgd_theirs(model, images, clean, count, args.epsilon), args.steps),
        "fwd": (lambda count: [forward_only(model, images, clean, 1) for _ in range(count)], args.queries),
        "square": (lambda count: square_ours(model, images, clean, count, args.epsilon), args.queries),
    }
    for function, count in runs.values():  # warm-up
        function(min(2, count))
    seconds = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, (function, count) in runs.items():
            elapsed, _ = timed(lambda: function(count), device)
            seconds[key].append(elapsed / count)
        progress.update(1)
    pick = statistics.median if args.stat == "median" else min
    return dict(model=name, batch=batch_size, random=name in RANDOM_WEIGHTS,
                **{key: pick(values) for key, values in seconds.items()})


def print_apgd_square_table(rows, args):
    print(f"\nuntargeted APGD (CE) and Square against the clean prediction: epsilon {args.epsilon:g} levels, "
          f"{args.steps} APGD steps, {args.queries} Square queries, early stop off; {args.stat} of {args.repeats}")
    header = (f"{'model':<19} {'batch':>5} {'fwd+bwd ms':>10} {'apgd ms':>8} {'ta apgd ms':>10} {'apgd/fb':>8} "
              f"{'apgd/ta':>8} {'fwd ms':>8} {'square ms':>9} {'square/fwd':>10}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['model'] + ('*' if row['random'] else ' '):<19} {row['batch']:>5} {1000 * row['fwd+bwd']:>10.1f} "
              f"{1000 * row['apgd']:>8.1f} {1000 * row['ta apgd']:>10.1f} {row['apgd'] / row['fwd+bwd']:>8.3f} "
              f"{row['apgd'] / row['ta apgd']:>8.3f} {1000 * row['fwd']:>8.1f} {1000 * row['square']:>9.1f} "
              f"{row['square'] / row['fwd']:>10.3f}")
    print("times per APGD step (apgd, ta apgd: torchattacks.APGD, fwd+bwd) and per Square query (square, fwd: one "
          "forward without gradients)")
    for row in rows:
        apgd, square = row["apgd"] / row["fwd+bwd"], row["square"] / row["fwd"]
        print(f"{row['model']} batch {row['batch']}: apgd/fwd+bwd {apgd:.3f} "
              f"({'meets' if apgd <= APGD_TARGET_RATIO else 'misses'} <= {APGD_TARGET_RATIO}), "
              f"square/fwd {square:.3f} ({'meets' if square <= SQUARE_TARGET_RATIO else 'misses'} "
              f"<= {SQUARE_TARGET_RATIO})")


def bench_apgd_square(args, device):
    from tqdm import tqdm
    rows = []
    with tqdm(total=len(args.models) * len(args.batch_sizes) * args.repeats, desc="timing apgd, square",
              unit="repeat", file=sys.stderr, leave=False) as progress:
        for name in args.models:
            for batch_size in args.batch_sizes:
                rows.append(measure_apgd_square(name, batch_size, device, args, progress))
    print_apgd_square_table(rows, args)


if __name__ == "__main__":
    run(main, get_args_parser())
