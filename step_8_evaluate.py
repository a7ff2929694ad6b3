"""Step 8: evaluate the attacks on a folder of photos, with the sanity checks of Carlini et al. 2019 ("On Evaluating
Adversarial Robustness").

    python step_8_evaluate.py FOLDER [--model resnet18] [--methods fgsm,pgd,mifgsm] [--epsilons 1,2,4,8,16]
                                     [--steps 1,5,10,20,50] [--target goldfish | --untargeted] [--batch-size 16]
                                     [--device auto|cpu|cuda] [--output-dir outputs/eval] [--resume] [--seed 0]
                                     [--defenses jpeg,bits,median,...] [--adaptive] [--eot 1]

Every photo is attacked with every method x epsilon x steps (fgsm is one step: once per epsilon). Each adversarial
image is saved as a PNG under OUTPUT_DIR/images/ and judged on that file read back from disk. Extra runs feed the
sanity checks: each iterative method at twice the largest steps (largest epsilon), and pgd with an unbounded budget
(epsilon 255). With --defenses, the first iterative method (pgd when given) at the largest steps is judged through
each defense: the plain attack's PNG, and with --adaptive a BPDA(+EOT) attack made through the defense (as step 7).
The judge of a random defense draws with another seed than the attacker.

Writes results.csv (one row per image x method x epsilon x steps x defense x attack, appended as each batch
finishes; --resume keeps the finished rows whose PNG is still there and does only the rest), summary.md (success
tables and the sanity checks, PASS or FAIL), success_vs_epsilon.png, success_vs_steps.png and defenses.png.
Columns: linf (levels) and l2 (pixels in [0, 1]) compare the PNG read back with the prepared original; seconds is
the attack's time per image (0 for a plain attack judged through a defense: it reuses the saved PNG).
"""
import argparse
import csv
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
from tqdm import tqdm

from step_2_pretrained import (DEFAULT_MODEL, OFFLINE_MODEL, find_class, get_device, get_label, load_model,
                               predict_images, prepare_image, to_tensor)
from utils.adaptive import JUDGE_SEED_OFFSET, defended_forward
from utils.attacks import ATTACKS, goal_reached, perturbation_size, run_attack
from utils.cli import ArgumentParser, UsageError, comma_list, number_in, run
from utils.defenses import DEFENSES, make_defense
from utils.figures import plt
from utils.files import atomic_path, save_figure, save_image, save_text
from utils.images import list_images, output_names

COLUMNS = ("image", "method", "epsilon", "steps", "defense", "attack", "target", "clean_label", "final_label",
           "defended_label", "clean_defended_label", "success", "steps_used", "linf", "l2", "seconds", "file")
KEY = ("image", "method", "epsilon", "steps", "defense", "attack")
UNBOUNDED = 255.0


@dataclass(frozen=True)
class Job:
    """One setting, run on every photo: an attack, judged bare (defense "none") or through a defense.
    attack "plain" is made against the bare model; "adaptive" through the defense (BPDA, EOT)."""
    method: str
    epsilon: float
    steps: int
    defense: str = "none"
    attack: str = "plain"

    @property
    def folder(self):
        prefix = f"adaptive_{self.defense}_" if self.attack == "adaptive" else ""
        return f"images/{prefix}{self.method}_eps{self.epsilon:g}_steps{self.steps}"

    @property
    def makes_images(self):
        return self.defense == "none" or self.attack == "adaptive"

    def key(self, image):
        return image, self.method, f"{self.epsilon:g}", str(self.steps), self.defense, self.attack


def job_of(row):
    return Job(row["method"], float(row["epsilon"]), int(row["steps"]), row["defense"], row["attack"])


@dataclass
class Photos:
    """The prepared photos and what each attack aims at."""
    names: list      # file names in FOLDER (the results' image column)
    stems: list      # distinct PNG names
    originals: list  # the 8-bit images the model sees
    clean: list      # their clean top-1
    goals: list      # the target, or (untargeted) the clean class to leave
    target: object   # the target class, None when untargeted


# ---- the plan -------------------------------------------------------------------------------------------------

def iterative_methods(methods):
    return [method for method in methods if ATTACKS[method].iterative]


def defense_method(methods):
    return "pgd" if "pgd" in methods else next(iter(iterative_methods(methods)), "pgd")


def top_steps(method, args):
    """The steps a method's headline number uses: the largest, or 1 for a one-step attack."""
    return max(args.steps) if ATTACKS[method].iterative else 1


def plan_jobs(args):
    """Every job in order: the grid, the sanity checks' extra runs, then the defense evaluation."""
    largest_epsilon, largest_steps = max(args.epsilons), max(args.steps)
    jobs = [Job(method, epsilon, steps) for method in args.methods for epsilon in args.epsilons
            for steps in (args.steps if ATTACKS[method].iterative else [1])]
    jobs += [Job(method, largest_epsilon, 2 * largest_steps) for method in iterative_methods(args.methods)]
    jobs.append(Job("pgd", UNBOUNDED, largest_steps))
    method, attacks = defense_method(args.methods), ("plain", "adaptive") if args.adaptive else ("plain",)
    for defense in args.defenses:  # the plain attack's PNGs first, then judged through each defense
        jobs += [Job(method, epsilon, largest_steps) for epsilon in args.epsilons]
        jobs += [Job(method, epsilon, largest_steps, defense, attack)
                 for epsilon in args.epsilons for attack in attacks]
    return list(dict.fromkeys(jobs))


# ---- inputs ---------------------------------------------------------------------------------------------------

def goal_class(args):
    """The target class index, or None for an untargeted evaluation."""
    if args.untargeted and args.target is not None:
        raise UsageError("--target and --untargeted exclude each other")
    if args.adaptive and not args.defenses:
        raise UsageError("--adaptive attacks through a defense: give --defenses too")
    return None if args.untargeted else find_class("1" if args.target is None else args.target)


def photo_paths(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    return list_images([folder])


def prepare_photos(model, paths, target, batch_size):
    originals = [prepare_image(path, model) for path in paths]
    clean = [label for start in range(0, len(originals), batch_size)
             for label in predict_images(model, originals[start:start + batch_size])]
    goals = clean if target is None else [target] * len(paths)
    return Photos([path.name for path in paths], output_names(paths), originals, clean, goals, target)


# ---- attacking and judging ------------------------------------------------------------------------------------

def attack_batch(model, photos, job, batch, args):
    """Adversarial 8-bit images for the photos in `batch`, and the steps each used."""
    forward = None
    if job.attack == "adaptive":
        forward = defended_forward(model, make_defense(job.defense, seed=args.seed))
    return run_attack(model, job.method, [photos.originals[i] for i in batch], [photos.goals[i] for i in batch],
                      epsilon=job.epsilon, steps=job.steps, targeted=photos.target is not None, seed=args.seed,
                      forward=forward, eot=args.eot)


def judge_batch(model, photos, job, batch, files, args):
    """Classify the saved PNGs read back (and through the real defense, with the judge's own seed): a dict of
    columns per photo."""
    back = [prepare_image(path, model) for path in files]  # the file read back, as a receiver would
    originals = [photos.originals[i] for i in batch]
    final = predict_images(model, back)
    linf, l2 = perturbation_size(to_tensor(back), to_tensor(originals))
    defended = clean_defended = [""] * len(batch)
    if job.defense != "none":
        judge = make_defense(job.defense, seed=args.seed + JUDGE_SEED_OFFSET)
        defended = predict_images(model, [judge(image) for image in back])
        clean_defended = predict_images(model, [judge(image) for image in originals])
    verdict = final if job.defense == "none" else defended
    return [{"final_label": final[k], "defended_label": defended[k], "clean_defended_label": clean_defended[k],
             "success": int(goal_reached(verdict[k], photos.goals[i], photos.target is None)),
             "linf": int(linf[k]), "l2": f"{l2[k]:.4f}"} for k, i in enumerate(batch)]


def run_batch(model, photos, job, batch, done, out, args):
    """The finished rows of `job` for the photos in `batch`."""
    started = time.perf_counter()
    files = [out / job.folder / f"{photos.stems[i]}.png" for i in batch]
    if job.makes_images:
        adversarial, steps_used = attack_batch(model, photos, job, batch, args)
        for image, path in zip(adversarial, files):
            save_image(image, path)
    else:  # the plain attack's PNGs, already judged bare: now through the defense
        bare = Job(job.method, job.epsilon, job.steps)
        steps_used = [done[bare.key(photos.names[i])]["steps_used"] for i in batch]
    seconds = (time.perf_counter() - started) / len(batch) if job.makes_images else 0.0
    judged = judge_batch(model, photos, job, batch, files, args)
    rows = []
    for i, path, steps, columns in zip(batch, files, steps_used, judged):
        row = dict(zip(KEY, job.key(photos.names[i])), target="" if photos.target is None else photos.target,
                   clean_label=photos.clean[i], steps_used=steps, seconds=f"{seconds:.3f}",
                   file=path.relative_to(out).as_posix(), **columns)
        rows.append({column: str(row[column]) for column in COLUMNS})
    return rows


# ---- results.csv ----------------------------------------------------------------------------------------------

def row_key(row):
    return tuple(row[column] for column in KEY)


def finished_rows(path, out):
    """--resume: the complete rows of results.csv whose PNG is still on disk, by key, in file order."""
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise UsageError(f"{path}: not the results of this script (other columns); run without --resume")
        rows = [row for row in reader if None not in row.values() and None not in row]
    return {row_key(row): row for row in rows if (out / row["file"]).is_file()}


def start_results(path, rows):
    """results.csv holding just the header and `rows`, written atomically."""
    with atomic_path(path) as temp, open(temp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def append_rows(path, rows):
    with open(path, "a", newline="") as handle:
        csv.DictWriter(handle, COLUMNS, lineterminator="\n").writerows(rows)
        handle.flush()


def evaluate(model, photos, jobs, done, out, args):
    """Run what is not done yet, appending each batch's rows to results.csv; returns every planned row."""
    pending = [(job, [i for i, name in enumerate(photos.names) if job.key(name) not in done]) for job in jobs]
    pending = [(job, todo) for job, todo in pending if todo]
    with tqdm(total=sum(len(todo) for _, todo in pending), unit="image", desc="evaluating") as bar:
        for job, todo in pending:
            bar.set_postfix_str(f"{job.folder.removeprefix('images/')} {job.defense} {job.attack}")
            for start in range(0, len(todo), args.batch_size):
                rows = run_batch(model, photos, job, todo[start:start + args.batch_size], done, out, args)
                append_rows(out / "results.csv", rows)
                done.update((row_key(row), row) for row in rows)
                bar.update(len(rows))
    return [done[job.key(name)] for job in jobs for name in photos.names]


# ---- summary.md and figures -----------------------------------------------------------------------------------

def group_mean(rows, value):
    """The mean of value(row) over the photos, per job."""
    groups = {}
    for row in rows:
        groups.setdefault(job_of(row), []).append(value(row))
    return {job: sum(values) / len(values) for job, values in groups.items()}


def percent(rate):
    return f"{100 * rate:.1f}%"


def check_monotone(rate, args):
    parts = [f"{method} " + " -> ".join(percent(rate[Job(method, epsilon, top_steps(method, args))])
                                        for epsilon in args.epsilons) for method in args.methods]
    ok = all(later >= earlier for method in args.methods for earlier, later in
             pairwise(rate[Job(method, epsilon, top_steps(method, args))] for epsilon in args.epsilons))
    return ok, "success never falls as epsilon grows (per method, epsilon " + \
        ", ".join(f"{epsilon:g}" for epsilon in args.epsilons) + "): " + "; ".join(parts)


def check_iterative_beats_one_step(rate, args):
    iterative, one_step = iterative_methods(args.methods), [m for m in args.methods if not ATTACKS[m].iterative]
    text = "iterative attacks at least as strong as one-step ones (per epsilon)"
    if not iterative or not one_step:
        return None, text + ": needs a one-step method (fgsm) and an iterative one in --methods"
    cell = {(method, epsilon): rate[Job(method, epsilon, top_steps(method, args))]
            for method in args.methods for epsilon in args.epsilons}
    ok = all(cell[m, epsilon] >= cell[f, epsilon] for m in iterative for f in one_step for epsilon in args.epsilons)
    parts = [f"epsilon {epsilon:g}: " + ", ".join(f"{m} {percent(cell[m, epsilon])}" for m in args.methods)
             for epsilon in args.epsilons]
    return ok, f"{text}: " + "; ".join(parts)


def check_converged(rate, args):
    epsilon, steps = max(args.epsilons), max(args.steps)
    text = f"doubling the steps ({steps} -> {2 * steps}, epsilon {epsilon:g}) changes success by under 1 point"
    methods = iterative_methods(args.methods)
    if not methods:
        return None, text + ": needs an iterative method in --methods"
    changes = {m: 100 * (rate[Job(m, epsilon, 2 * steps)] - rate[Job(m, epsilon, steps)]) for m in methods}
    parts = [f"{m} {percent(rate[Job(m, epsilon, steps)])} -> {percent(rate[Job(m, epsilon, 2 * steps)])} "
             f"({changes[m]:+.1f} points)" for m in methods]
    return all(abs(change) < 1 for change in changes.values()), f"{text}: " + "; ".join(parts)


def check_unbounded(rate, args):
    steps = max(args.steps)
    success = rate[Job("pgd", UNBOUNDED, steps)]
    return success == 1, f"an unbounded budget (pgd, epsilon 255, {steps} steps) reaches 100%: {percent(success)}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def defense_table(rate, kept, args):
    method, steps = defense_method(args.methods), max(args.steps)
    rows = []
    for defense in args.defenses:
        for epsilon in args.epsilons:
            plain = Job(method, epsilon, steps, defense)
            adaptive = Job(method, epsilon, steps, defense, "adaptive")
            rows.append((defense, f"{epsilon:g}", percent(kept[plain]), percent(rate[plain]),
                         percent(rate[adaptive]) if args.adaptive else "not run (--adaptive)"))
    header = ("defense", "epsilon", "clean accuracy kept", f"plain {method} success", f"adaptive {method} success")
    return (f"## Defenses ({method}, {steps} steps; judged on the PNG read back, through the real defense)\n\n"
            + markdown_table(header, rows) + "\n")


def summary_markdown(rate, kept, photos, args):
    goal = f"targeted ({get_label(photos.target)})" if photos.target is not None else "untargeted"
    header = ("method", "steps", *(f"eps {epsilon:g}" for epsilon in args.epsilons))
    table = [(m, top_steps(m, args), *(percent(rate[Job(m, e, top_steps(m, args))]) for e in args.epsilons))
             for m in args.methods]
    checks = [check_iterative_beats_one_step(rate, args), check_monotone(rate, args), check_converged(rate, args),
              check_unbounded(rate, args)]
    verdicts = {True: "PASS", False: "FAIL", None: "N/A"}
    lines = [f"# Evaluation of {args.model} on {len(photos.names)} photos from {args.folder}", "",
             f"Goal: {goal}. Success is judged on each saved PNG read back from disk. "
             f"Epsilon in levels out of 255 (L-infinity).", "",
             f"## Success rate per method and epsilon (at the largest steps, {max(args.steps)})", "",
             markdown_table(header, table), "",
             "## Sanity checks (Carlini et al. 2019, \"On Evaluating Adversarial Robustness\")", ""]
    lines += [f"{number}. **{verdicts[ok]}** {text}" for number, (ok, text) in enumerate(checks, 1)]
    if args.defenses:
        lines += ["", defense_table(rate, kept, args)]
    return "\n".join(lines).rstrip() + "\n"


def line_figure(series, xlabel, title):
    """Success rate (%) lines, one per (label, xs, rates, matplotlib style keywords)."""
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for label, xs, rates, style in series:
        axis.plot(xs, [100 * rate for rate in rates], label=label, **{"marker": "o", **style})
    ticks = sorted({x for _, xs, _, _ in series for x in xs})
    axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
    axis.minorticks_off()
    axis.set(xlabel=xlabel, ylabel="attack success rate (%)", title=title, ylim=(-5, 105))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def figures(rate, kept, args):
    """{file name: figure}: success against epsilon and steps per method, and through each defense."""
    epsilon, steps = max(args.epsilons), max(args.steps)
    color = {m: {"color": f"C{k}"} for k, m in enumerate(args.methods)}  # a method's colour is the same in both
    by_epsilon = [(m, args.epsilons, [rate[Job(m, e, top_steps(m, args))] for e in args.epsilons], color[m])
                  for m in args.methods]
    by_steps = [(m, [1], [rate[Job(m, epsilon, 1)]], color[m]) if not ATTACKS[m].iterative else
                (m, [*args.steps, 2 * steps], [rate[Job(m, epsilon, s)] for s in [*args.steps, 2 * steps]], color[m])
                for m in args.methods]
    result = {"success_vs_epsilon.png": line_figure(by_epsilon, "epsilon (levels out of 255)",
                                                    f"success at the largest steps ({steps}; fgsm: 1)"),
              "success_vs_steps.png": line_figure(by_steps, "steps", f"success at epsilon {epsilon:g}")}
    if args.defenses:
        method = defense_method(args.methods)
        series = []
        for color, defense in enumerate(args.defenses):
            for attack in ("plain", "adaptive") if args.adaptive else ("plain",):
                cells = [Job(method, e, steps, defense, attack) for e in args.epsilons]
                style = {"color": f"C{color}", "linestyle": "-" if attack == "plain" else "--",
                         "marker": "o" if attack == "plain" else "s"}
                series.append((f"{defense} (clean kept {percent(kept[cells[0]])}), {attack}", args.epsilons,
                               [rate[cell] for cell in cells], style))
        result["defenses.png"] = line_figure(series, "epsilon (levels out of 255)",
                                             f"{method}, {steps} steps, judged through the defense")
    return result


def write_report(rows, photos, out, args):
    rate = group_mean(rows, lambda row: int(row["success"]))
    kept = group_mean(rows, lambda row: int(row["clean_defended_label"] == row["clean_label"]))
    summary = save_text(summary_markdown(rate, kept, photos, args), out / "summary.md")
    for name, figure in figures(rate, kept, args).items():
        save_figure(figure, out / name)
        plt.close(figure)
    return summary


def main(args):
    torch.manual_seed(args.seed)
    target = goal_class(args)
    paths = photo_paths(args.folder)
    model = load_model(args.model, get_device(args.device))
    photos = prepare_photos(model, paths, target, args.batch_size)
    out = Path(args.output_dir)
    done = finished_rows(out / "results.csv", out) if args.resume else {}
    start_results(out / "results.csv", list(done.values()))
    rows = evaluate(model, photos, plan_jobs(args), done, out, args)
    summary = write_report(rows, photos, out, args)
    print(summary.read_text())
    print(f"Wrote {len(rows)} rows to {out / 'results.csv'}, {summary} and the figures in {out}")


# ---- command line ---------------------------------------------------------------------------------------------

def one_of(choices, what):
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose from {', '.join(choices)}")
        return text
    parse.__name__ = what
    return parse


def listed(kind, name, ascending=False):
    """A comma-separated list of `kind` (see utils.cli.comma_list) without repeats, sorted when `ascending`."""
    parse = comma_list(kind, name)

    def distinct_items(text):
        items = list(dict.fromkeys(parse(text)))
        return sorted(items) if ascending else items
    distinct_items.__name__ = name
    return distinct_items


def get_args_parser():
    parser = ArgumentParser(description="Evaluate attacks (and defenses) on a folder of photos, with sanity checks.")
    parser.add_argument("folder", help="a folder of photos")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"torchvision classifier or {OFFLINE_MODEL} (default: %(default)s)")
    parser.add_argument("--methods", type=listed(one_of(ATTACKS, "method"), "--methods"), default="fgsm,pgd,mifgsm",
                        help=f"comma-separated, from {', '.join(ATTACKS)} (default: %(default)s)")
    epsilon = number_in(0, 255, low_open=True, name="--epsilons")
    parser.add_argument("--epsilons", type=listed(epsilon, "--epsilons", True), default="1,2,4,8,16",
                        help="L-infinity budgets in levels, each in (0, 255] (default: %(default)s)")
    parser.add_argument("--steps", type=listed(number_in(1, 100000, int, name="--steps"), "--steps", True),
                        default="1,5,10,20,50", help="steps of the iterative methods, each >= 1 (default: %(default)s)")
    parser.add_argument("--target", help="class index or name to reach (default: 1, goldfish)")
    parser.add_argument("--untargeted", action="store_true", help="any class but the clean prediction")
    parser.add_argument("--batch-size", type=number_in(1, 4096, int, name="--batch-size"), default=16)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--output-dir", default="outputs/eval", help="(default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="keep the finished rows of results.csv, do the rest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--defenses", type=listed(one_of(DEFENSES, "defense"), "--defenses"), default=[],
                        help=f"also judge through these defenses (default parameters): {', '.join(DEFENSES)}")
    parser.add_argument("--adaptive", action="store_true", help="also attack through each defense (BPDA, EOT)")
    parser.add_argument("--eot", type=number_in(1, 1000, int, name="--eot"), default=1,
                        help="random draws of the defense averaged per adaptive step (default: %(default)s)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
