"""How fast is this project's PGD per step, next to the model itself and next to torchattacks, and in which settings?

    python bench/attack_speed.py [--models resnet18,efficientnet_lite0] [--batch-sizes 1,16] [--device auto|cpu|cuda]
                                 [--steps 10] [--epsilon 8] [--alpha LEVELS] [--repeats 3] [--threads N] [--stat median|min]
                                 [--clock auto|cpu|wall] [--compile] [--no-norms] [--l2-epsilon 0.5] [--l1-epsilon 12]

For each model and batch size, on the same device and the same images, it times per gradient step:
- fwd+bwd: the model's forward, a cross-entropy and the backward to the input (weights frozen), in PyTorch's default
  settings (contiguous memory, fp32): the floor the peers stand on;
- torchattacks: torchattacks.PGD on that same default model (it leaves the model as it is given), with the same eps,
  step size and steps, no random start, targeted by label;
- ours, in each configuration: fp32 (the default: batch norms folded into the convolutions, and the memory format
  of utils/speed/memory_format.py's fixed rule), the other memory format forced, bf16 autocast (fp16 too on CUDA) with
  fp32-confirmed successes, and with --compile, torch.compile (its compile time printed). All targeted, early stop
  off, no random start. The "memory format" line per model and batch gives the rule's format and its measured time
  against the other's: the measurement the rule stands on, made here and never at run time.
Each is warmed up, then timed `--repeats` times (interleaved, so a busy machine slows all alike) and the min (or, with
--stat median, the median) is kept. With one CPU thread the clock is this process's CPU time (--clock): on cores
shared with other work, the wall clock would also count the time spent waiting for a core. Every success is an fp32 verdict: the returned image rounded to 8 bits and
classified by the default fp32 model as the target, goldfish (1). A configuration's verdicts "match" when they equal,
image by image, those of ours in fp32; the summary line per model and batch quotes the fastest configuration whose
verdicts match.
Then two more tables, untargeted against the clean prediction: APGD per step and Square per query (--queries; in
L-infinity, and in L2 beside torchattacks' Square(norm="L2")), and,
unless --no-norms, the L2 and L1 attacks and FAB-T per step (PGD-L2, APGD in L2 and L1, FAB-T in each norm with one
target class), each against fwd+bwd and against torchattacks' counterpart where it has one, in the same run. There a
step's time is a run of --steps steps less a run of one, over --steps - 1: what a call spends outside its steps (FAB-T
ranks its targets and judges its last image) counts once per call, not once per step; the call's own ratio is printed
beside it.
After each of the three tables, ours inside and outside the network: one more run of each attack of the table (at
--steps steps, --queries for Square; the norms table's at its longer run), its network clocked
(utils.speed.NetworkClock) by the wall clock: the forward and backward passes through the network, the time inside
them, the time outside them (the run's wall time less the time inside: the attack's own arithmetic, the input's
layout, the judging) and outside/inside, the overhead an implementation making the same passes could remove.
"""
import argparse
import copy
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
                               predict, prepare_images, to_tensor)
from utils import speed  # noqa: E402
from utils.attacks import ATTACKS, make_attack  # noqa: E402
from utils.cli import ArgumentParser, UsageError, comma_list, number_in, run  # noqa: E402

TARGET = 1  # goldfish
RANDOM_WEIGHTS = ("resnet18",)  # timed with random weights: no network here, and the timing does not depend on them
# The targets for ours/torchattacks on a CPU: (model, batch) -> ratio; every other case: parity or better.
TARGETS = {(OFFLINE_MODEL, 16): 0.6, ("resnet18", 16): 0.9}
REFERENCE = "fp32"  # the configuration whose verdicts the others must match


def photo_paths():
    """The offline photos: matplotlib's Grace Hopper and five of scikit-image's samples (found without importing it)."""
    skimage_data = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
    return [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"] + [skimage_data / n for n in names]


def get_model(name, device, fold=True):
    """A private copy (each configuration sets its own memory format), with its batch norms folded as load_model does
    (fold=False: the network as published, for the floor and torchattacks); random weights for RANDOM_WEIGHTS."""
    if name in RANDOM_WEIGHTS:
        torch.manual_seed(0)
        model = freeze(load_torchvision(name, pretrained=False))
        if fold:
            model.net = speed.fold_batch_norms(model.net)
        return model.to(device)
    return copy.deepcopy(load_model(name, device, fold))


def get_batch(model, batch_size, device):
    """`batch_size` photos (the offline ones, repeated) as a float batch on whole levels, and the target labels."""
    images = prepare_images(photo_paths(), model)
    images = [images[i % len(images)] for i in range(batch_size)]
    return to_tensor(images, device), torch.full((batch_size,), TARGET, device=device)


def print_header_line(header):
    """A table's header, underlined."""
    print(header)
    print("-" * len(header))


def summarized(seconds, args):
    """{key: the --stat (min or median) of its timings}."""
    pick = statistics.median if args.stat == "median" else min
    return {key: pick(values) for key, values in seconds.items()}


def timed(function, device, now):
    """(seconds, result) of function(), with the device's queue drained before and after."""
    speed.synchronize(device)
    start = now()
    result = function()
    speed.synchronize(device)
    return now() - start, result


def clocked(model, call):
    """One run of call(twin), `twin` being `model` with its network clocked (utils.speed.NetworkClock), by the wall
    clock (the one the network's clock reads): {"forward": passes, "backward": passes, "inside": seconds inside them,
    "total": seconds in all}."""
    clock = speed.NetworkClock(model.net)
    twin = model.with_net(clock)
    total, _ = timed(lambda: call(twin), model.mean.device, time.perf_counter)
    forward, backward, inside = clock.reading()
    return {"forward": forward, "backward": backward, "inside": inside, "total": total}


def get_clock(name, device):
    """auto: this process's CPU time on a CPU with one torch thread (other processes on shared cores then only make
    it wait, they do not add to it), the wall clock otherwise."""
    if name == "auto":
        return speed.clock(device), "process CPU time" if speed.clock(device) is time.process_time else "wall clock"
    return (time.process_time, "process CPU time") if name == "cpu" else (time.perf_counter, "wall clock")


# ---- the things timed -----------------------------------------------------------------------------------------

def forward_backward(model, images, labels, steps):
    """The floor: `steps` forwards, losses and backwards to the input."""
    for _ in range(steps):
        pixels = images.detach().requires_grad_(True)
        loss = F.cross_entropy(model(pixels), labels, reduction="sum")
        grad, = torch.autograd.grad(loss, pixels)
    return None


@torch.no_grad()
def forward_only(model, images, labels, steps):
    """One forward without gradients: what judging the final image costs."""
    model(images)
    return None


def ours(model, images, labels, steps, epsilon, alpha, precision):
    attack = make_attack("pgd", model, epsilon=epsilon, steps=steps, alpha=alpha, targeted=True, early_stop=False,
                         random_start=False, precision=precision)
    return attack(images, labels).adversarial


def theirs(model, images, labels, steps, epsilon, alpha):
    import torchattacks
    attack = torchattacks.PGD(model, eps=epsilon / 255, alpha=alpha / 255, steps=steps, random_start=False)
    attack.set_mode_targeted_by_label(quiet=True)
    return attack(images, labels)


def verdicts(judge, adversarial, labels):
    """Per image: is its 8-bit version classified as the target by the fp32 model?"""
    levels = adversarial.detach().mul(255).round().clamp(0, 255).div(255)
    return tuple((predict(judge, levels).argmax(dim=1) == labels).tolist())


# ---- one measurement ------------------------------------------------------------------------------------------

def configurations(name, device, images, args):
    """Ours' configurations: label -> (model, precision). The models are copies: each keeps its own memory format;
    the one labelled by a format name runs in the format the rule does not pick."""
    default = get_model(name, device)
    other = get_model(name, device)
    other.memory_format = other_format(default, device)
    configs = {REFERENCE: (default, "fp32"), speed.format_name(other.memory_format): (other, "fp32"),
               "bf16": (get_model(name, device), "bf16")}
    if torch.device(device).type == "cuda":
        configs["fp16"] = (get_model(name, device), "fp16")
    if args.compile:
        compiled, seconds = speed.compile_model(get_model(name, device), images, device)
        configs[f"compiled ({seconds:.0f} s to compile)"] = (compiled, "fp32")
    return configs


def other_format(model, device):
    """The memory format the rule does not pick for this model on this device."""
    rule = speed.memory_format_rule(model.net, device)
    return torch.contiguous_format if rule == torch.channels_last else torch.channels_last


def chosen_format(model, images):
    """The memory format the attack ran in: the rule's (auto) or the one forced."""
    if model.memory_format != "auto":
        return speed.format_name(model.memory_format)
    return "rule: " + speed.format_name(model.format_for(images))


def measure(name, batch_size, device, args, progress):
    """Per-step seconds and fp32 verdicts of the floor, torchattacks and each configuration of ours."""
    plain = get_model(name, device, fold=False)
    plain.memory_format = torch.contiguous_format  # PyTorch's default settings, as a peer would run the model
    images, labels = get_batch(plain, batch_size, device)
    configs = configurations(name, device, images, args)
    runs = {
        "fwd+bwd": lambda steps: forward_backward(plain, images, labels, steps),
        "fwd": lambda steps: forward_only(plain, images, labels, steps),
        "torchattacks": lambda steps: theirs(plain, images, labels, steps, args.epsilon, args.alpha),
    }
    for label, (model, precision) in configs.items():
        runs[label] = (lambda model, precision: lambda steps: ours(model, images, labels, steps, args.epsilon,
                                                                     args.alpha, precision))(model, precision)
    for function in runs.values():  # warm-up: allocator, oneDNN/cuDNN kernels
        function(min(2, args.steps))
    seconds = {key: [] for key in runs}
    outputs = {}
    for _ in range(args.repeats):
        for key, function in runs.items():
            elapsed, outputs[key] = timed(lambda: function(args.steps), device, args.now)
            seconds[key].append(elapsed / (1 if key == "fwd" else args.steps))
        progress.update(1)
    inside = {f"pgd Linf {label.split(' ')[0]}": clocked(model, lambda twin, precision=precision: ours(
        twin, images, labels, args.steps, args.epsilon, args.alpha, precision)) for label, (model, precision) in configs.items()}
    return {"model": name, "batch": batch_size, "random": name in RANDOM_WEIGHTS, "clocked": inside,
            "seconds": summarized(seconds, args),
            "verdicts": {key: verdicts(plain, output, labels) for key, output in outputs.items() if output is not None},
            "formats": {key: chosen_format(model, images) for key, (model, _) in configs.items()},
            "ours": list(configs)}


def fastest_matching(row):
    """The fastest configuration of ours whose fp32 verdicts equal the fp32 configuration's, image by image."""
    matching = [key for key in row["ours"] if row["verdicts"][key] == row["verdicts"][REFERENCE]]
    return min(matching, key=lambda key: row["seconds"][key])


# ---- report ---------------------------------------------------------------------------------------------------

def print_header(args, device):
    import torchattacks
    where = torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else "cpu"
    print(f"device: {device} ({where}), torch {torch.__version__}, torchattacks {torchattacks.__version__}, "
          f"torch threads: {torch.get_num_threads()}, interop threads: {torch.get_num_interop_threads()}")
    print(f"targeted PGD to goldfish ({TARGET}): epsilon {args.epsilon:g} levels, alpha {args.alpha:g} levels, "
          f"{args.steps} steps, no random start, early stop off; {args.stat} of {args.repeats} repeats after a warm-up; "
          f"times are per gradient step, by the {args.clock_name}; success = fp32 verdict on the 8-bit image")


def describe(row, key):
    if key in ("fwd+bwd", "fwd", "torchattacks"):
        return {"fwd+bwd": "fwd+bwd (the floor)", "fwd": "fwd (one call, no grad)",
                "torchattacks": "torchattacks PGD"}[key]
    return f"ours {key} [{row['formats'][key]}]"


def print_row_table(row):
    star = "*" if row["random"] else ""
    print(f"\n{row['model']}{star} batch {row['batch']}")
    width = max(len(describe(row, key)) for key in row["seconds"])
    header = f"  {'run':<{width}} {'ms/step':>9} {'/fwd+bwd':>9} {'/tattacks':>9} {'success':>8} {'verdicts':>9}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    floor, theirs_time = row["seconds"]["fwd+bwd"], row["seconds"]["torchattacks"]
    reference = row["verdicts"][REFERENCE]
    for key, value in row["seconds"].items():
        found = row["verdicts"].get(key)
        success = f"{sum(found) / len(found):.0%}" if found is not None else "-"
        same = "-" if found is None else ("= fp32" if found == reference else "differ")
        print(f"  {describe(row, key):<{width}} {1000 * value:>9.1f} {value / floor:>9.3f} {value / theirs_time:>9.3f} "
              f"{success:>8} {same:>9}")


def summary_line(row):
    best = fastest_matching(row)
    ratio = row["seconds"][best] / row["seconds"]["fwd+bwd"]
    versus = row["seconds"][best] / row["seconds"]["torchattacks"]
    target = TARGETS.get((row["model"], row["batch"]), 1.0)
    return (f"{row['model']} batch {row['batch']}: ours/fwd+bwd {ratio:.3f} (ours = {best}), "
            f"ours/torchattacks {versus:.3f} ({'meets' if versus <= target else 'misses'} <= {target:g})")


def format_line(row):
    """The rule's memory format against the other, measured: what the rule in utils/speed/memory_format.py stands on."""
    other = next(key for key in row["ours"] if key in speed.MEMORY_FORMATS)
    ratio = row["seconds"][REFERENCE] / row["seconds"][other]
    return (f"memory format, {row['model']} batch {row['batch']}: {row['formats'][REFERENCE].removeprefix('rule: ')} "
            f"(the rule) takes {ratio:.3f} of {other}'s time per step")


def print_table(rows):
    for row in rows:
        print_row_table(row)
    print("\nfwd: per call, not per step; ours also judges its final image with one more forward, which fwd+bwd and "
          "torchattacks do not. [rule: ...] is the memory format utils/speed/memory_format.py's fixed rule picks for "
          "that model and device; the configuration named after the other format forces it.")
    if any(row["random"] for row in rows):
        print("* random weights (no network to fetch ImageNet ones): timing only, its success rates say nothing about "
              "attacking an ImageNet classifier")
    for row in rows:
        print(format_line(row))
    for row in rows:
        print(summary_line(row))


def main(args):
    device = get_device(args.device)
    for name in set(args.models) - set(RANDOM_WEIGHTS):
        load_model(name, device)  # a bad name or file is named in one line before any timing
    if args.compile and torch.device(device).type == "cpu" and speed.compiler_missing():
        raise UsageError(f"--compile: {speed.compiler_missing()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.alpha is None:
        # the project's default step, passed to both attacks
        args.alpha = ATTACKS["pgd"](None, epsilon=args.epsilon, steps=args.steps).alpha * 255
    args.now, args.clock_name = get_clock(args.clock, device)
    print_header(args, device)
    rows = bench_each(args, device, measure, "pgd")
    print_table(rows)
    print_clocked_table(rows, f"targeted PGD, {args.steps} steps")
    if args.queries:
        rows = bench_each(args, device, measure_apgd_square, "apgd, square")
        print_apgd_square_table(rows, args)
        print_clocked_table(rows, f"APGD, {args.steps} steps; Square, {args.queries} queries")
    if args.norms:
        rows = bench_each(args, device, measure_norms, "norms")
        print_norms_table(rows, args)
        print_clocked_table(rows, f"the L2 and L1 attacks and FAB-T, {rows[0]['steps']} steps")


def get_args_parser():
    parser = ArgumentParser(description="Time this project's targeted PGD per step, in each speed configuration, "
                                        "against the model's forward+backward and torchattacks' PGD.")
    parser.add_argument("--models", type=comma_list(name="model"), default=["resnet18", OFFLINE_MODEL],
                        help="comma-separated, each any --model of the steps (a name, a .pt2/.pt file, timm:NAME, "
                             "robustbench:DATASET/THREAT/NAME); resnet18 gets random weights (default: "
                             "resnet18,efficientnet_lite0)")
    parser.add_argument("--batch-sizes", type=comma_list(number_in(1, 4096, int, name="batch size"), name="batch size"),
                        default=[1, 16], help="comma-separated (default: 1,16)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--steps", type=number_in(1, 10000, int, name="--steps"), default=10,
                        help="gradient steps per attack (default: %(default)s)")
    parser.add_argument("--epsilon", type=number_in(0, 255, name="--epsilon"), default=8,
                        help="L-infinity budget in levels out of 255 (default: %(default)s)")
    parser.add_argument("--alpha", type=number_in(0, 255, name="--alpha", low_open=True), default=None,
                        help="step size in levels (default: the project's PGD default, max(2.5 * epsilon / steps, 0.25))")
    parser.add_argument("--queries", type=number_in(0, 100000, int, name="--queries"), default=20,
                        help="Square queries per timing; APGD and Square are timed too unless 0 (default: %(default)s)")
    parser.add_argument("--repeats", type=number_in(1, 1000, int, name="--repeats"), default=3,
                        help="timed runs per measurement (default: %(default)s)")
    parser.add_argument("--threads", type=number_in(1, 1024, int, name="--threads"), default=None,
                        help="torch CPU threads (default: torch's own choice; on a shared machine 1 is steadier)")
    parser.add_argument("--stat", choices=["median", "min"], default="min",
                        help="how repeats are summarized; other processes only ever add time, so the min is the least "
                             "disturbed run (default: %(default)s)")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="cpu: this process's CPU time, steady on shared cores with one thread; auto: cpu with "
                             "--threads 1 on a CPU, wall otherwise (default: %(default)s)")
    parser.add_argument("--norms", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the L2 and L1 attacks and FAB-T in each norm (default: on)")
    parser.add_argument("--l2-epsilon", type=number_in(0, 1000, name="--l2-epsilon", low_open=True), default=0.5,
                        help="L2 budget of the norms table, in [0, 1] pixel units (default 0.5)")
    parser.add_argument("--l1-epsilon", type=number_in(0, 100000, name="--l1-epsilon", low_open=True), default=12.0,
                        help="L1 budget of the norms table, in [0, 1] pixel units (default 12)")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours on a torch.compile'd model (slow to compile: a minute or more per model)")
    return parser


# ---- APGD and Square --------------------------------------------------------------------------------------------
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


def square_ours(model, images, labels, queries, epsilon, norm="Linf"):
    attack = make_attack("square", model, epsilon=epsilon, queries=queries, targeted=False, early_stop=False,
                         norm=norm)
    return attack(images, labels).adversarial


def square_l2_theirs(model, images, labels, queries, epsilon):
    """torchattacks' Square in L2 (its `view`s want contiguous tensors: the model and images given so)."""
    import torchattacks
    contiguous = model.with_net(model.net, memory_format=torch.contiguous_format)
    return torchattacks.Square(contiguous, norm="L2", eps=epsilon, n_queries=queries, n_restarts=1,
                               p_init=0.8)(images.contiguous(), labels)


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
        "square L2": (lambda count: square_ours(model, images, clean, count, args.l2_epsilon, "L2"), args.queries),
        "ta square L2": (lambda count: square_l2_theirs(model, images, clean, count, args.l2_epsilon), args.queries),
    }
    for function, count in runs.values():  # warm-up
        function(min(2, count))
    seconds = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, (function, count) in runs.items():
            elapsed, _ = timed(lambda: function(count), device, args.now)
            seconds[key].append(elapsed / count)
        progress.update(1)
    inside = {"apgd Linf": clocked(model, lambda twin: apgd_ours(twin, images, clean, args.steps, args.epsilon)),
              "square Linf": clocked(model, lambda twin: square_ours(twin, images, clean, args.queries, args.epsilon)),
              "square L2": clocked(model, lambda twin: square_ours(twin, images, clean, args.queries, args.l2_epsilon,
                                                                   "L2"))}
    return dict(model=name, batch=batch_size, random=name in RANDOM_WEIGHTS, clocked=inside, **summarized(seconds, args))


def print_apgd_square_table(rows, args):
    print(f"\nuntargeted APGD (CE) and Square against the clean prediction: epsilon {args.epsilon:g} levels "
          f"(Square L2: {args.l2_epsilon:g} in [0, 1] units), {args.steps} APGD steps, {args.queries} Square queries, "
          f"early stop off; {args.stat} of {args.repeats}")
    header = (f"{'model':<19} {'batch':>5} {'fwd+bwd ms':>10} {'apgd ms':>8} {'ta apgd ms':>10} {'apgd/fb':>8} "
              f"{'apgd/ta':>8} {'fwd ms':>8} {'square ms':>9} {'square/fwd':>10} {'sq L2 ms':>8} {'ta sq L2':>8} "
              f"{'L2/fwd':>7} {'L2/ta':>6}")
    print_header_line(header)
    for row in rows:
        print(f"{row['model'] + ('*' if row['random'] else ' '):<19} {row['batch']:>5} {1000 * row['fwd+bwd']:>10.1f} "
              f"{1000 * row['apgd']:>8.1f} {1000 * row['ta apgd']:>10.1f} {row['apgd'] / row['fwd+bwd']:>8.3f} "
              f"{row['apgd'] / row['ta apgd']:>8.3f} {1000 * row['fwd']:>8.1f} {1000 * row['square']:>9.1f} "
              f"{row['square'] / row['fwd']:>10.3f} {1000 * row['square L2']:>8.1f} {1000 * row['ta square L2']:>8.1f} "
              f"{row['square L2'] / row['fwd']:>7.3f} {row['square L2'] / row['ta square L2']:>6.3f}")
    print("times per APGD step (apgd, ta apgd: torchattacks.APGD, fwd+bwd) and per Square query (square, square L2, "
          "ta sq L2: torchattacks.Square(norm='L2'), fwd: one forward without gradients)")
    for row in rows:
        apgd, square, l2 = row["apgd"] / row["fwd+bwd"], row["square"] / row["fwd"], row["square L2"] / row["fwd"]
        print(f"{row['model']} batch {row['batch']} (apgd, square): apgd/fwd+bwd {apgd:.3f} "
              f"({'meets' if apgd <= APGD_TARGET_RATIO else 'misses'} <= {APGD_TARGET_RATIO}), "
              f"square/fwd {square:.3f} ({'meets' if square <= SQUARE_TARGET_RATIO else 'misses'} "
              f"<= {SQUARE_TARGET_RATIO}), square L2/fwd {l2:.3f} "
              f"({'meets' if l2 <= SQUARE_TARGET_RATIO else 'misses'} <= {SQUARE_TARGET_RATIO})")


def print_clocked_table(rows, what):
    """Ours inside and outside the network, per attack and norm: the rows' one clocked run each (see `clocked`)."""
    print(f"\nours inside and outside the network ({what}): one more run of each, its network clocked "
          "(utils.speed.NetworkClock), by the wall clock")
    header = (f"{'model':<19} {'batch':>5} {'attack':<22} {'passes':>9} {'in network ms':>13} {'outside ms':>10} "
              f"{'total ms':>9} {'outside/inside':>14}")
    print_header_line(header)
    for row in rows:
        for key, run in row["clocked"].items():
            outside = run["total"] - run["inside"]
            ratio = f"{outside / run['inside']:.3f}" if run["inside"] > 0 else "-"
            print(f"{row['model'] + ('*' if row['random'] else ' '):<19} {row['batch']:>5} {key:<22} "
                  f"{run['forward']:>5}+{run['backward']:<3} {1000 * run['inside']:>13.2f} {1000 * outside:>10.2f} "
                  f"{1000 * run['total']:>9.2f} {ratio:>14}")
    print("passes: forward + backward passes through the network; outside: the run's wall time less its time inside "
          "them (the attack's own arithmetic, the input's layout, the judging)")


def bench_each(args, device, measure, what):
    """measure(name, batch size, device, args, progress) for every --models x --batch-sizes: the rows, in order."""
    from tqdm import tqdm
    rows = []
    with tqdm(total=len(args.models) * len(args.batch_sizes) * args.repeats, desc=f"timing {what}",
              unit="repeat", file=sys.stderr, leave=False) as progress:
        for name in args.models:
            for batch_size in args.batch_sizes:
                progress.set_postfix_str(f"{name} batch {batch_size}")
                rows.append(measure(name, batch_size, device, args, progress))
    return rows


# ---- the L2 and L1 attacks, and FAB-T ---------------------------------------------------------------------------
# Untargeted against the clean prediction, early stop off, one target class for FAB-T on both sides (so a step is a
# step): ours per gradient step next to fwd+bwd and, where torchattacks has the attack, next to its counterpart on the
# same model and images (PGDL2, APGD(norm="L2"), FAB(multi_targeted=True) in L-infinity and L2; its targeted FAB
# fails in L1). l1-APGD has no torchattacks counterpart (ART's runs on numpy, a different cost model).
NORM_TARGET_RATIO = 1.1  # each new attack's step <= 1.1 x fwd+bwd


def norm_attacks(args):
    """name: (our method, norm, epsilon in its units, our options, torchattacks' constructor or None)."""
    import torchattacks
    linf, l2, l1 = args.epsilon, args.l2_epsilon, args.l1_epsilon

    def fab(norm, epsilon):
        def make(model, steps):
            attack = torchattacks.FAB(model, norm=norm, eps=epsilon, steps=steps, n_restarts=1, multi_targeted=True,
                                      n_classes=1000)
            attack.n_target_classes = 1
            return attack
        return make
    return {
        "pgd L2": ("pgd", "L2", l2, {}, lambda model, steps: torchattacks.PGDL2(
            model, eps=l2, alpha=2.5 * l2 / steps, steps=steps, random_start=False)),
        "apgd L2": ("apgd", "L2", l2, {}, lambda model, steps: torchattacks.APGD(
            model, norm="L2", eps=l2, steps=steps, n_restarts=1, loss="ce")),
        "apgd L1": ("apgd", "L1", l1, {}, None),
        "fab Linf": ("fab", "Linf", linf, dict(target_classes=1), fab("Linf", linf / 255)),
        "fab L2": ("fab", "L2", l2, dict(target_classes=1), fab("L2", l2)),
        "fab L1": ("fab", "L1", l1, dict(target_classes=1), None),
    }


def measure_norms(name, batch_size, device, args, progress):
    """Seconds per step: fwd+bwd, and each attack of `norm_attacks`, ours and torchattacks' where it has one."""
    model = get_model(name, device)
    images, _ = get_batch(model, batch_size, device)
    with torch.no_grad():
        clean = model(images).argmax(dim=1)

    def our_run(method, norm, epsilon, options):
        return lambda count: make_attack(method, model, norm=norm, epsilon=epsilon, steps=count, targeted=False,
                                         early_stop=False, **options)(images, clean)
    # torchattacks' L2 attacks `view` their gradients: they get the model in contiguous memory, as PyTorch's default
    contiguous = model.with_net(model.net, memory_format=torch.contiguous_format)
    runs = {"fwd+bwd": lambda count: forward_backward(model, images, clean, count)}
    for key, (method, norm, epsilon, options, peer) in norm_attacks(args).items():
        runs[key] = our_run(method, norm, epsilon, options)
        if peer is not None:
            runs["ta " + key] = (lambda make: lambda count: make(contiguous, count)(images.contiguous(), clean))(peer)
    for function in runs.values():  # warm-up
        function(min(2, args.steps))
    # each run at one step and at `many`: the difference is what the steps cost, without what a call spends outside
    # them (ranking FAB-T's targets, judging the last and the returned image), which counts once per call
    many = max(2, args.steps)
    seconds = {(key, count): [] for key in runs for count in (1, many)}
    for _ in range(args.repeats):
        for key, function in runs.items():
            for count in (1, many):
                elapsed, _ = timed(lambda: function(count), device, args.now)
                seconds[key, count].append(elapsed)
        progress.update(1)
    took = summarized(seconds, args)
    inside = {}
    for key, (method, norm, epsilon, options, _) in norm_attacks(args).items():
        inside[key] = clocked(model, lambda twin, method=method, norm=norm, epsilon=epsilon, options=options: make_attack(
            method, twin, norm=norm, epsilon=epsilon, steps=many, targeted=False, early_stop=False, **options)(images, clean))
    return dict(model=name, batch=batch_size, random=name in RANDOM_WEIGHTS, steps=many, clocked=inside,
                step={key: (took[key, many] - took[key, 1]) / (many - 1) for key in runs},
                call={key: took[key, many] / many for key in runs})


def print_norms_table(rows, args):
    many = rows[0]["steps"]
    print(f"\nuntargeted L2, L1 and FAB-T (one target class) against the clean prediction: epsilon {args.epsilon:g} "
          f"levels (Linf), {args.l2_epsilon:g} (L2), {args.l1_epsilon:g} (L1) in [0, 1] units; each run at 1 and at "
          f"{many} steps, early stop off; {args.stat} of {args.repeats}")
    header = (f"{'model':<19} {'batch':>5} {'attack':<9} {'fwd+bwd ms':>10} {'ours ms':>8} {'ta ms':>8} "
              f"{'ours/fb':>8} {'ours/ta':>8} {'call/fb':>8}")
    print_header_line(header)
    for row in rows:
        step, call = row["step"], row["call"]
        for key in norm_attacks(args):
            peer = step.get("ta " + key)
            print(f"{row['model'] + ('*' if row['random'] else ' '):<19} {row['batch']:>5} {key:<9} "
                  f"{1000 * step['fwd+bwd']:>10.1f} {1000 * step[key]:>8.1f} "
                  f"{'-' if peer is None else f'{1000 * peer:.1f}':>8} {step[key] / step['fwd+bwd']:>8.3f} "
                  f"{'-' if peer is None else f'{step[key] / peer:.3f}':>8} {call[key] / call['fwd+bwd']:>8.3f}")
    print(f"times per gradient step: a run of {many} steps less a run of one, over {many - 1} (ta: torchattacks' "
          f"counterpart on the same model and images); call/fb: the run of {many} steps over {many} forward + "
          "backward passes, with what a call spends outside its steps")
    for row in rows:
        ratios = {key: row["step"][key] / row["step"]["fwd+bwd"] for key in norm_attacks(args)}
        missed = [f"{key} {ratio:.3f}" for key, ratio in ratios.items() if ratio > NORM_TARGET_RATIO]
        print(f"{row['model']} batch {row['batch']} (norms): step/fwd+bwd <= {NORM_TARGET_RATIO}: "
              + ("all meet" if not missed else "misses: " + ", ".join(missed)))


if __name__ == "__main__":
    run(main, get_args_parser())
