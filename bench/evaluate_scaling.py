"""Does step 8 scale across processes, and does its memory stay flat as the folder grows?

    python bench/evaluate_scaling.py [--images 64] [--steps 2] [--batch-size 8] [--repeats 1]
                                     [--memory-images 100,800]

Throughput: one evaluation of `--images` synthetic photos (seeded noise, 256 x 256) with efficientnet_lite0, pgd at
epsilon 2 and `--steps` steps with early stop off (so every image costs the same: the grid's pgd at steps and 2 x steps
plus the unbounded run, 4 x steps gradient steps per image), run as 1 process x 2 threads, 1 process x 1 thread and
2 processes x 1 thread (torchrun). Images per second come from step 8's own timer (from the first batch to the last
rank's end, model loading and the report left out), with the speedups over 1 x 1 and 1 x 2.

Memory: the peak resident set of one process evaluating 100 and 800 synthetic photos (fgsm, epsilon 2, batch 16) with
a small random-weight network at 224 x 224 input (the memory in question is the photos', not the model's), read from
the process's own getrusage. Keeping every prepared photo would cost 147 KB each: 103 MB more for 800 than for 100.

Targets (on a 2-core machine): 2 x 1 >= 1.7 x the throughput of 1 x 1 and >= 1.0 x that of 1 x 2; peak
memory for 800 photos within 15% of that for 100.
"""
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utils.cli import ArgumentParser, comma_list, number_in, run  # noqa: E402
from utils.evaluation.distributed import launcher  # noqa: E402

CONFIGURATIONS = ((1, 2), (1, 1), (2, 1))  # processes x threads
TIMER = re.compile(r"Evaluated (\d+) photos in ([\d.]+) s")


def synthetic_photos(folder, count, size=256):
    """`count` seeded noise photos as PNG files (decoding, resizing and cropping them is part of the work)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in tqdm(range(count), desc=f"writing {count} photos", unit="photo", leave=False, file=sys.stderr):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index:05d}.png",
                                                                                   compress_level=1)
    return folder


def step_8(processes, threads, folder, out, *args):
    """Run step 8 as one plain process or under torchrun; returns its stdout."""
    script = [str(REPO / "step_8_evaluate.py"), str(folder), "--output-dir", str(out), "--threads", str(threads), *args]
    result = subprocess.run(launcher(processes) + script, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"step 8 failed ({processes} x {threads}):\n{result.stderr[-3000:]}")
    return result.stdout


def throughput(processes, threads, folder, work, args):
    found = TIMER.search(step_8(processes, threads, folder, work / f"out_{processes}x{threads}", "--model",
                                "efficientnet_lite0", "--methods", "pgd", "--epsilons", "2", "--steps",
                                str(args.steps), "--no-early-stop", "--batch-size", str(args.batch_size)))
    images, seconds = int(found[1]), float(found[2])
    return images / seconds


def memory_child(folder, out):
    """In a fresh process: step 8 on a small 224 x 224 network; prints this process's peak resident set in KiB."""
    import torch
    from torch import nn

    import step_8_evaluate
    from step_2_pretrained import Classifier, Preprocessing, freeze
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=4, padding=3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(32, 1000))
    model = freeze(Classifier(net, Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "small"))
    parser = step_8_evaluate.get_args_parser()
    args = parser.parse_args([str(folder), "--output-dir", str(out), "--methods", "fgsm", "--epsilons", "2",
                              "--threads", "1", "--batch-size", "16", "--device", "cpu"])
    step_8_evaluate.main(args, model=model)
    print(f"peak_rss_kib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")


def peak_memory(folder, out):
    result = subprocess.run([sys.executable, __file__, "--memory-child", str(folder), str(out)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"memory run failed:\n{result.stderr[-3000:]}")
    return int(re.search(r"peak_rss_kib (\d+)", result.stdout)[1]) / 1024


def verdict(ok):
    return "PASS" if ok else "FAIL"


def main(args):
    if args.memory_child:
        return memory_child(*args.memory_child)
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        folder = synthetic_photos(work / "photos", args.images)
        rate = {}
        runs = [configuration for _ in range(args.repeats) for configuration in CONFIGURATIONS]  # interleaved
        for processes, threads in tqdm(runs, desc="throughput", leave=False, file=sys.stderr):
            measured = throughput(processes, threads, folder, work, args)
            rate[processes, threads] = max(measured, rate.get((processes, threads), 0))
        print(f"## Throughput: {args.images} photos, efficientnet_lite0, pgd {args.steps} steps (early stop off), "
              f"batch size {args.batch_size}, best of {args.repeats} interleaved run(s)\n")
        print(f"{os.cpu_count()} cores; load average (1 min) when done: {os.getloadavg()[0]:.2f} (other processes "
              "share the cores: above about 0.5 the speedups understate what an idle machine gives)\n")
        print("| processes x threads | photos/s | speedup over 1 x 1 | speedup over 1 x 2 |")
        print("|---|---|---|---|")
        for (processes, threads), value in rate.items():
            print(f"| {processes} x {threads} | {value:.3f} | {value / rate[1, 1]:.2f} | {value / rate[1, 2]:.2f} |")
        over_one, over_two = rate[2, 1] / rate[1, 1], rate[2, 1] / rate[1, 2]
        print(f"\n2 x 1 over 1 x 1: {over_one:.2f} (target >= 1.7: {verdict(over_one >= 1.7)}); "
              f"2 x 1 over 1 x 2: {over_two:.2f} (target >= 1.0: {verdict(over_two >= 1.0)})\n")
        peaks = {}
        for count in tqdm(args.memory_images, desc="memory", leave=False, file=sys.stderr):
            peaks[count] = peak_memory(synthetic_photos(work / f"memory_{count}", count), work / f"memory_out_{count}")
        small, large = min(peaks), max(peaks)
        print("## Peak resident memory of one process (small network, fgsm, batch 16)\n")
        print("| photos | peak RSS (MiB) |\n|---|---|")
        for count, mib in peaks.items():
            print(f"| {count} | {mib:.0f} |")
        growth = peaks[large] / peaks[small] - 1
        print(f"\n{large} photos against {small}: {100 * growth:+.1f}% (target within 15%: {verdict(growth <= 0.15)})")


def get_args_parser():
    parser = ArgumentParser(description="Measure step 8's scaling over processes and its memory as the folder grows.")
    parser.add_argument("--images", type=number_in(8, 100000, int, name="--images"), default=64,
                        help="photos for the throughput runs (default: %(default)s)")
    parser.add_argument("--steps", type=number_in(1, 1000, int, name="--steps"), default=2,
                        help="pgd steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=number_in(1, 4096, int, name="--batch-size"), default=8,
                        help="(default: %(default)s)")
    parser.add_argument("--repeats", type=number_in(1, 100, int, name="--repeats"), default=1,
                        help="runs per configuration, interleaved; the fastest is kept: other processes only ever "
                             "slow a run down (default: %(default)s)")
    parser.add_argument("--memory-images", type=comma_list(number_in(1, 100000, int, name="count"), "count"),
                        default=[100, 800], help="folder sizes for the memory runs (default: 100,800)")
    parser.add_argument("--memory-child", nargs=2, metavar=("FOLDER", "OUT"), help="(internal) one memory run")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
