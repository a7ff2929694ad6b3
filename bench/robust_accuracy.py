"""Our robust accuracy and its cost beside the reference AutoAttack's, on the same images and model, in one run.

    python bench/robust_accuracy.py [--model outputs/robust-demo/adversarial.pt2] [--folder digits/test]
                                    [--norm Linf,L2,L1] [--epsilons 32,2,12] [--batch-size 64] [--threads 1]
                                    [--processes 1]

Per norm, one row. Ours: step 8 as a user runs it (a fresh process: its start-up counts against us), with --norm and
its default ensemble there (AutoAttack's standard attacks that have a version in the norm: apgd, apgd-t, fab, square
in L-infinity; no square in L1 here; AutoAttack's flow, early stop, on the 8-bit lattice) and the reference's
iterations (--steps 100: step 8's ensemble otherwise runs its largest --steps, 50 by default), judged on the PNGs
it writes. The reference: pyautoattack's standard version in that norm (APGD-CE, APGD-T, FAB-T, Square; its L1
settings in L1) in this process, judged on its adversarial images put on the 8-bit lattice inside the ball. Both on
the same folder (an ImageFolder with true labels), model, epsilon and batch size (--batch-size: step 8's, and the
reference's `run_standard_evaluation(..., bs)`; a score-based attack's cost per query is mostly fixed per batch, so
the two are timed on the same batches); wall time of each. The target: ours at most the
reference's robust accuracy plus one image, in at most half its time. The reference's network is clocked
(utils.speed.NetworkClock): the seconds its forward and backward passes took, over its whole time, are the floor
that ratio has for an implementation making the same passes. A second table splits each run's time between the
network and the rest: ours, step 8 run once more on the same command line in this process (one process of --threads
threads) with its model's network clocked, per attack of its ensemble and for the whole run; the reference's clocked
run as a whole. Per row: the forward and backward passes through the network, the seconds inside them, the seconds
outside them (the run's wall time less the time inside) and outside/inside. `make robust-demo` makes the default model and
folder. Epsilon: levels out of 255 in Linf, the norm of the whole perturbation in [0, 1] units in L2 and L1.
Both get the same cores: --threads each by default; with --processes N, ours runs as N torchrun ranks of --threads
threads on this machine (whole batches dealt among them; its results are one process's), the reference, which has
no such mode, in one process of N x --threads threads.
"""
import contextlib
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from step_2_pretrained import load_model, model_from_args, prepare_image, to_tensor  # noqa: E402
from utils.attacks import NORMS  # noqa: E402
from utils.cli import ArgumentParser, UsageError, comma_list, listed, number_in, one_of, run  # noqa: E402
from utils.flags import add_benchmark_arguments, norm_budgets, positive_number  # noqa: E402
from utils.data import labelled_photos  # noqa: E402
from utils.evaluation.distributed import launcher  # noqa: E402
from utils.speed import NetworkClock, get_device  # noqa: E402
from utils.evaluation.reference import STANDARD_ITERATIONS, reference_autoattack, worst_case_robust  # noqa: E402




def step_8_arguments(args, norm, epsilon, out):
    """Step 8's command line (after the program) for our run of the ensemble in `norm` at `epsilon`."""
    return [str(args.folder), "--model", str(args.model), "--norm", norm, "--epsilons", f"{epsilon:g}", "--batch-size",
            str(args.batch_size), "--steps", str(STANDARD_ITERATIONS), "--threads", str(args.threads), "--output-dir",
            str(out)]


def run_ours(args, norm, epsilon, out):
    """Step 8's ensemble in a fresh process (--processes > 1: as that many torchrun ranks, each --threads threads):
    (robust images, images, wall seconds)."""
    command = [*launcher(args.processes), str(ROOT / "step_8_evaluate.py"), *step_8_arguments(args, norm, epsilon, out)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise UsageError(f"step 8 failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    return (*worst_case_robust(out, epsilon), seconds)


def split(clock, before, seconds):
    """What a run between the reading `before` and now did: {"forward": passes, "backward": passes, "inside": seconds
    inside them, "total": the run's wall seconds}."""
    forward, backward, inside = (now - then for now, then in zip(clock.reading(), before))
    return {"forward": forward, "backward": backward, "inside": inside, "total": seconds}


def run_ours_clocked(args, norm, epsilon, out):
    """Step 8 on our command line once more, in this process (one process of --threads threads; what it prints is
    dropped), its model's network clocked (NetworkClock, the wall clock): {attack: split} for each attack of its
    ensemble in the order they ran, then "all" for the whole run (loading, the clean forward, the judging of the PNGs
    read back and the report included). Step 8 gets the clocked model as a benchmark's own network (its main's
    `model`); the engine's call of each attack is wrapped for the run, and put back."""
    import step_8_evaluate
    from utils.evaluation import engine
    runs, run_attack = {}, engine.run_attack
    step_8_args = step_8_evaluate.get_args_parser().parse_args(step_8_arguments(args, norm, epsilon, out))

    def run_attack_clocked(model, method, *arguments, **options):
        before, started = clock.reading(), time.perf_counter()
        try:
            return run_attack(model, method, *arguments, **options)
        finally:
            one = split(clock, before, time.perf_counter() - started)
            runs[method] = {key: runs.get(method, {}).get(key, 0) + value for key, value in one.items()}
    threads, started = torch.get_num_threads(), time.perf_counter()
    try:
        model = model_from_args(step_8_args, get_device(step_8_args.device))
        clock = NetworkClock(model.net)
        with mock.patch.object(engine, "run_attack", run_attack_clocked), contextlib.redirect_stdout(io.StringIO()):
            step_8_evaluate.main(step_8_args, model=model.with_net(clock))
    finally:
        torch.set_num_threads(threads)
    runs["all"] = split(clock, (0, 0, 0.0), time.perf_counter() - started)
    return runs


def run_reference(args, norm, epsilon):
    """The reference AutoAttack on the same 8-bit images, in this process (its torch threads: the cores ours was
    given, --processes x --threads), its network clocked (utils.speed.NetworkClock): (robust images, images, wall
    seconds, its split: see `split`)."""
    model = load_model(args.model)
    paths, _, labels = labelled_photos(args.folder, model.classes, model.name)
    images, labels = to_tensor([prepare_image(path, model) for path in paths]), torch.tensor(labels)
    clocked = NetworkClock(model.net)
    started = time.perf_counter()
    robust, _ = reference_autoattack(model.with_net(clocked), images, labels, epsilon, batch_size=args.batch_size,
                                     norm=norm)
    seconds = time.perf_counter() - started
    return robust, len(paths), seconds, split(clocked, (0, 0, 0.0), seconds)


def main(args):
    if not Path(args.model).is_file():
        raise UsageError(f"{args.model}: no such model (make robust-demo trains it)")
    budgets = norm_budgets(args.norm, args.epsilons)
    reference_threads = args.processes * args.threads  # the cores ours gets, in one process
    torch.set_num_threads(reference_threads)
    cores = (f"{args.threads} thread(s)" if args.processes == 1 else
             f"ours as {args.processes} torchrun processes of {args.threads} thread(s), the reference in one process "
             f"of {reference_threads} threads")
    print(f"{Path(args.folder)}, model {Path(args.model).name}, batches of {args.batch_size}, {STANDARD_ITERATIONS} "
          f"iterations per gradient attack, {cores}; "
          "epsilon in levels out of 255 (Linf), in [0, 1] pixel units (L2, L1):\n")
    print("| norm | epsilon | images | ours: robust accuracy | reference AutoAttack | ours - reference | ours (s) | "
          "reference (s) | time ratio | reference in its network (s) | floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    splits = []
    for norm, epsilon in budgets:
        with tempfile.TemporaryDirectory() as out:
            ours, images, our_seconds = run_ours(args, norm, epsilon, Path(out))
        with tempfile.TemporaryDirectory() as out:
            splits += [(norm, "ours", attack, run) for attack, run in run_ours_clocked(args, norm, epsilon, out).items()]
        reference, _, reference_seconds, reference_split = run_reference(args, norm, epsilon)
        splits.append((norm, "reference", "all", reference_split))
        network_seconds = reference_split["inside"]
        print(f"| {norm} | {epsilon:g} | {images} | {ours / images:.1%} ({ours}) | {reference / images:.1%} "
              f"({reference}) | {ours - reference:+d} | {our_seconds:.1f} | {reference_seconds:.1f} | "
              f"x{our_seconds / reference_seconds:.2f} | {network_seconds:.1f} | x{network_seconds / reference_seconds:.2f} |",
              flush=True)
    print("\nTarget: ours at most the reference plus one image, in at most half its time (x0.5).")
    print("Floor: the reference's time inside the network (its forward and backward passes, clocked in its run) over "
          "its whole time: the ratio an implementation making the same passes would reach if it spent nothing "
          "outside them.")
    print("\nInside and outside the network: ours per attack of step 8's ensemble and in all (step 8 once more, in this "
          "process, its network clocked), the reference in all (its run above):\n")
    print("| norm | run | attack | passes (forward+backward) | in network (s) | outside (s) | total (s) | "
          "outside/inside |")
    print("|---|---|---|---|---|---|---|---|")
    for norm, who, attack, run in splits:
        outside = run["total"] - run["inside"]
        ratio = f"{outside / run['inside']:.3f}" if run["inside"] > 0 else "-"
        print(f"| {norm} | {who} | {attack} | {run['forward']}+{run['backward']} | {run['inside']:.3f} | {outside:.3f} | "
              f"{run['total']:.3f} | {ratio} |")
    print("\nOutside: the run's wall time less its time inside the network's passes (the attacks' own arithmetic, and "
          "for \"all\" the loading, the judging and the report): what an implementation making the same passes could "
          "save at most.")


def get_args_parser():
    parser = ArgumentParser(description="Robust accuracy and wall time: step 8's ensemble against the reference AutoAttack.")
    add_benchmark_arguments(parser, model="outputs/robust-demo/adversarial.pt2", epsilon=None)
    parser.add_argument("--norm", type=listed(one_of(NORMS, "norm"), "--norm"), default=["Linf"],
                        help="threat models, one row each, comma-separated (default: Linf)")
    parser.add_argument("--epsilons", "--epsilon", type=comma_list(positive_number("--epsilons"), "--epsilons"),
                        default=None,
                        help="one budget per norm, in its units, or several for one norm (default: Linf 32 levels, "
                             "L2 2, L1 12)")
    parser.add_argument("--batch-size", type=number_in(1, 4096, int, name="--batch-size"), default=64,
                        help="images per batch, ours and the reference's alike (default: %(default)s)")
    parser.add_argument("--processes", type=number_in(1, 64, int, name="--processes"), default=1,
                        help="run ours as this many torchrun processes of --threads threads each (whole batches dealt "
                             "among them), the reference in one process with as many threads in all "
                             "(default: %(default)s)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
