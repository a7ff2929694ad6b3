"""Step 8: evaluate attacks on a folder of photos: attack success with the sanity checks of Carlini et al. 2019
("On Evaluating Adversarial Robustness"), and with true labels, clean and robust accuracy as AutoAttack reports it.

    python step_8_evaluate.py FOLDER [--model resnet18] [--labels imagenet-val | --labels FILE.csv]
                                     [--methods fgsm,pgd,mifgsm] [--epsilons 1,2,4,8,16] [--steps 1,5,10,20,50]
                                     [--target goldfish | --untargeted] [--ensemble apgd,apgd-t,square]
                                     [--queries 5000] [--target-classes 9] [--defenses jpeg,...] [--adaptive] [--eot 1]
                                     [--batch-size 16] [--workers 0] [--threads N] [--device auto|cpu|cuda]
                                     [--output-dir outputs/eval] [--resume] [--strict] [--seed 0]
                                     [--precision fp32|bf16|fp16] [--memory-format auto] [--compile]
    torchrun --nproc_per_node 2 step_8_evaluate.py FOLDER ...      (the same run, split across processes)

Photos are listed in sorted order and cut into batches of --batch-size; a DataLoader (--workers) decodes one batch at
a time and the batch runs every planned job before the next is read, so memory stays flat however large the folder.
Under torchrun, batch k runs on rank k % world size; each rank appends its rows to OUTPUT_DIR/shards/ as each job
finishes a batch, and rank 0 merges them into results.csv in the order one process writes it.

Labels: an ImageFolder tree (subfolders named by WordNet ID or class index), --labels imagenet-val or --labels
FILE.csv (columns image,label). Without labels, the clean predictions stand in for them.

The jobs. The grid (--methods, the default without labels or with --defenses): every method x epsilon x steps (fgsm
once per epsilon), the sanity checks' extra runs (each iterative method at twice the largest steps, pgd unbounded at
epsilon 255) and, with --defenses, the first iterative method at the largest steps judged through each defense (the
plain attack's PNG, and with --adaptive a BPDA(+EOT) attack through it; the judge of a random defense draws with
another seed). The ensemble (with labels, the default; untargeted): a "clean" row per photo, then per epsilon the
attacks of --ensemble in order, each on the photos correctly classified when clean that every earlier attack failed to
fool (AutoAttack's flow), apgd/apgd-t at the largest --steps, square with --queries.

Every adversarial image is saved as a PNG under OUTPUT_DIR/images/ and judged on that file read back from disk.
Writes results.csv (one row per photo and job that ran), summary.md, robust_accuracy.csv (with the ensemble) and the
figures. --resume keeps the finished rows (of results.csv and of every shard, whatever number of processes wrote
them) whose PNG is still there, and does only the rest. Unreadable files are named on stderr, listed in summary.md and
left out of every rate; --strict makes the first one an error. Columns linf (levels) and l2 (pixels in [0, 1])
compare the PNG read back with the prepared original; seconds is the attack's time per image.

Reproducibility: the same inputs, seed, --batch-size, threads per process, --memory-format, --precision and device
give the same bytes, whatever the number of processes and however busy the machine (no clock decides a float);
another batch size, thread count, memory format or precision gives other floats on CPU, hence the same verdicts
except for images at the decision boundary.
"""
import argparse
import csv
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
import torchvision
from tqdm import tqdm

from step_2_pretrained import (DEFAULT_MODEL, OFFLINE_MODEL, find_class, get_device, get_image_transform, get_label,
                               load_image, load_model, predict_images, prepare_image, to_tensor)
from utils import distributed, speed
from utils.adaptive import JUDGE_SEED_OFFSET, defended_forward
from utils.attacks import ATTACKS, budget_unit, goal_reached, perturbation_size, run_attack
from utils.cli import ArgumentParser, UsageError, comma_list, number_in, run
from utils.data import IMAGENET_VAL, PhotoDataset, cut, list_photos, photo_batches, read_labels
from utils.defenses import DEFENSES, make_defense
from utils.figures import grouped_bars_figure, plt
from utils.files import atomic_path, save_figure, save_image, save_text
from utils.images import output_names

COLUMNS = ("image", "method", "epsilon", "steps", "defense", "attack", "target", "label", "clean_label",
           "clean_correct", "final_label", "defended_label", "clean_defended_label", "success", "steps_used", "linf",
           "l2", "seconds", "file")  # file last: a row torn mid-append names no PNG, so --resume drops it
KEY = ("image", "method", "epsilon", "steps", "defense", "attack")
ACCURACY_COLUMNS = ("epsilon", "attack", "images", "clean_accuracy", "robust_accuracy")
UNBOUNDED = 255.0
DEFAULT_METHODS = ("fgsm", "pgd", "mifgsm")
DEFAULT_ENSEMBLE = ("apgd", "apgd-t", "square")
SHARDS = "shards"


@dataclass(frozen=True)
class Job:
    """One setting, run on the photos of each batch that need it. attack: "plain" (against the bare model, judged
    bare with defense "none" or through a defense), "adaptive" (BPDA(+EOT) through the defense), "ensemble" (an
    ensemble stage, on the photos every earlier stage failed to fool) or "clean" (no attack: the photo as it is)."""
    method: str
    epsilon: float
    steps: int
    defense: str = "none"
    attack: str = "plain"

    @property
    def folder(self):
        if self.attack == "clean":
            return "images/clean"
        prefix = {"adaptive": f"adaptive_{self.defense}_", "ensemble": "ensemble_"}.get(self.attack, "")
        return f"images/{prefix}{self.method}_eps{self.epsilon:g}_steps{self.steps}"

    @property
    def makes_images(self):
        return self.defense == "none" or self.attack == "adaptive"

    def key(self, image):
        return image, self.method, f"{self.epsilon:g}", str(self.steps), self.defense, self.attack


CLEAN = Job("none", 0.0, 0, attack="clean")


def job_of(row):
    return Job(row["method"], float(row["epsilon"]), int(row["steps"]), row["defense"], row["attack"])


@dataclass
class Photos:
    """The photos of the folder, in order (what is known before decoding any)."""
    folder: Path
    paths: list    # the files
    names: list    # relative to the folder: the results' image column
    stems: list    # distinct PNG names
    labels: list   # true classes, or None
    label_source: str


@dataclass
class Plan:
    """What runs, resolved from the arguments: the grid's methods (empty: no grid), the ensemble, the goal."""
    methods: list
    ensemble: list
    target: object  # the target class of the grid, None when untargeted
    jobs: list

    def stages_at(self, epsilon):
        """The ensemble's jobs at `epsilon`, in the order they run."""
        return [job for job in self.jobs if job.attack == "ensemble" and job.epsilon == epsilon]


# ---- the plan -------------------------------------------------------------------------------------------------

def iterative_methods(methods):
    return [method for method in methods if ATTACKS[method].iterative]


def defense_method(methods):
    return "pgd" if "pgd" in methods else next(iter(iterative_methods(methods)), "pgd")


def top_steps(method, args):
    """The steps a method's headline number uses: the largest, or 1 for a one-step attack."""
    return max(args.steps) if ATTACKS[method].iterative else 1


def stage_steps(method, args):
    """An ensemble stage's budget: the largest --steps, or --queries for a gradient-free attack."""
    return args.queries if ATTACKS[method].gradient_free else max(args.steps)


def grid_jobs(methods, args):
    """The grid, the sanity checks' extra runs, then the defense evaluation."""
    largest_epsilon, largest_steps = max(args.epsilons), max(args.steps)
    jobs = [Job(method, epsilon, steps) for method in methods for epsilon in args.epsilons
            for steps in (args.steps if ATTACKS[method].iterative else [1])]
    jobs += [Job(method, largest_epsilon, 2 * largest_steps) for method in iterative_methods(methods)]
    jobs.append(Job("pgd", UNBOUNDED, largest_steps))
    method, attacks = defense_method(methods), ("plain", "adaptive") if args.adaptive else ("plain",)
    for defense in args.defenses:  # the plain attack's PNGs first, then judged through each defense
        jobs += [Job(method, epsilon, largest_steps) for epsilon in args.epsilons]
        jobs += [Job(method, epsilon, largest_steps, defense, attack)
                 for epsilon in args.epsilons for attack in attacks]
    return jobs


def make_plan(args, labelled):
    """Decide what runs. With labels and no --methods (nor --defenses) only the ensemble runs; the grid runs when
    --methods is given, without labels, or for --defenses."""
    if args.untargeted and args.target is not None:
        raise UsageError("--target and --untargeted exclude each other")
    if args.adaptive and not args.defenses:
        raise UsageError("--adaptive attacks through a defense: give --defenses too")
    if args.ensemble and not labelled:
        raise UsageError("--ensemble measures robust accuracy: it needs true labels (an ImageFolder tree or --labels)")
    if args.ensemble and args.target is not None:
        raise UsageError("--ensemble measures untargeted robustness: it excludes --target")
    ensemble = args.ensemble if args.ensemble is not None else (
        list(DEFAULT_ENSEMBLE) if labelled and args.target is None else [])
    unknown = [method for method in ensemble if method not in ATTACKS]
    if unknown:
        raise UsageError(f"--ensemble: unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}")
    grid = args.methods is not None or not labelled or bool(args.defenses)
    methods = (args.methods or list(DEFAULT_METHODS)) if grid else []
    untargeted = args.untargeted or (labelled and args.target is None)
    target = None if untargeted else find_class("1" if args.target is None else args.target)
    jobs = [CLEAN] if labelled else []
    jobs += grid_jobs(methods, args) if grid else []
    jobs += [Job(method, epsilon, stage_steps(method, args), attack="ensemble")
             for epsilon in args.epsilons for method in ensemble]
    return Plan(methods, ensemble, target, list(dict.fromkeys(jobs)))


# ---- inputs ---------------------------------------------------------------------------------------------------

def find_photos(args):
    paths, names = list_photos(args.folder)
    labels = read_labels(args.labels, names, find_class)
    return Photos(Path(args.folder), paths, names, output_names(paths), labels and labels.classes,
                  labels.source if labels else None)


def prepare_model(args, device):
    """The one place the model is made ready: --precision checked, --memory-format set, --compile applied."""
    return speed.prepare_model(load_model(args.model, device), args, args.batch_size, device)


def check_readable(photos, batches, context):
    """--strict: every file of every rank decodes, before anything is written; else the first bad one is an error."""
    failure = None
    # no bar off a terminal: its leftovers would precede the one-line error in a log
    for index in tqdm([i for batch in batches for i in batch], unit="image", desc="checking", leave=False,
                      disable=None):
        try:
            load_image(photos.paths[index])
        except UsageError as error:
            failure = (index, str(error))
            break
    failures = [found for found in distributed.gather(failure, context) if found]
    if failures:
        raise UsageError(min(failures)[1] + " (--strict)")


# ---- attacking and judging ------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One decoded batch: the readable photos' indices, their 8-bit images, clean predictions and goals."""
    members: list
    originals: dict
    clean: dict
    goals: dict


def decode_batch(model, photos, plan, items):
    """The readable photos of a DataLoader batch, their clean predictions and goals; and the unreadable ones."""
    members = [index for index, image, _ in items if image is not None]
    originals = {index: image for index, image, _ in items if image is not None}
    clean = dict(zip(members, predict_images(model, [originals[i] for i in members]))) if members else {}
    if plan.target is not None:
        goals = {i: plan.target for i in members}
    else:  # untargeted: leave the true class, or without labels the clean prediction
        goals = {i: photos.labels[i] if photos.labels else clean[i] for i in members}
    skipped = [(photos.names[index], reason) for index, image, reason in items if image is None]
    return Batch(members, originals, clean, goals), skipped


def attack_options(job, plan, args):
    """The one place an attack's options are built (every attack drops the ones it does not take)."""
    return dict(epsilon=job.epsilon, steps=job.steps, targeted=plan.target is not None and job.attack != "ensemble",
                seed=args.seed, eot=args.eot, early_stop=not args.no_early_stop, queries=args.queries,
                target_classes=args.target_classes, precision=args.precision)


def attack_batch(model, plan, job, batch, todo, args):
    """Adversarial 8-bit images for the photos `todo`, and the steps each used."""
    if job.attack == "clean":
        return [batch.originals[i] for i in todo], [0] * len(todo)
    forward = None
    if job.attack == "adaptive":
        forward = defended_forward(model, make_defense(job.defense, seed=args.seed))
    return run_attack(model, job.method, [batch.originals[i] for i in todo], [batch.goals[i] for i in todo],
                      forward=forward, **attack_options(job, plan, args))


def judge_batch(model, plan, job, batch, todo, files, args):
    """Classify the saved PNGs read back (and through the real defense, with the judge's own seed): a dict of
    columns per photo."""
    back = [prepare_image(path, model) for path in files]  # the file read back, as a receiver would
    originals = [batch.originals[i] for i in todo]
    final = predict_images(model, back)
    linf, l2 = perturbation_size(to_tensor(back), to_tensor(originals))
    defended = clean_defended = [""] * len(todo)
    if job.defense != "none":
        judge = make_defense(job.defense, seed=args.seed + JUDGE_SEED_OFFSET)
        defended = predict_images(model, [judge(image) for image in back])
        clean_defended = predict_images(model, [judge(image) for image in originals])
    verdict = final if job.defense == "none" else defended
    untargeted = plan.target is None or job.attack == "ensemble"
    return [{"final_label": final[k], "defended_label": defended[k], "clean_defended_label": clean_defended[k],
             "success": int(goal_reached(verdict[k], batch.goals[i], untargeted)),
             "linf": int(linf[k]), "l2": f"{l2[k]:.4f}"} for k, i in enumerate(todo)]


def run_job(model, photos, plan, job, batch, todo, done, out, args):
    """The finished rows of `job` for the photos `todo` of `batch`."""
    started = time.perf_counter()
    files = [out / job.folder / f"{photos.stems[i]}.png" for i in todo]
    if job.makes_images:
        adversarial, steps_used = attack_batch(model, plan, job, batch, todo, args)
        for image, path in zip(adversarial, files):
            save_image(image, path)
    else:  # the plain attack's PNGs, already judged bare: now through the defense
        bare = Job(job.method, job.epsilon, job.steps)
        steps_used = [done[bare.key(photos.names[i])]["steps_used"] for i in todo]
    seconds = (time.perf_counter() - started) / len(todo) if job.makes_images and job.attack != "clean" else 0.0
    rows = []
    judged = judge_batch(model, plan, job, batch, todo, files, args)
    for i, path, steps, columns in zip(todo, files, steps_used, judged):
        label = photos.labels[i] if photos.labels else ""
        row = dict(zip(KEY, job.key(photos.names[i])), target="" if plan.target is None else plan.target,
                   label=label, clean_label=batch.clean[i],
                   clean_correct="" if label == "" else int(batch.clean[i] == label), steps_used=steps,
                   seconds=f"{seconds:.3f}", file=path.relative_to(out).as_posix(), **columns)
        rows.append({column: str(row[column]) for column in COLUMNS})
    return rows


def needed(job, name, plan, done):
    """Whether `job` still has to run on photo `name`, given the rows so far. An ensemble stage runs only on a photo
    correctly classified when clean that no earlier stage (same epsilon) fooled."""
    if job.key(name) in done:
        return False
    if job.attack != "ensemble":
        return True
    clean = done.get(CLEAN.key(name))
    if clean is None or clean["clean_correct"] != "1":
        return False
    for stage in plan.stages_at(job.epsilon):
        if stage == job:
            return True
        earlier = done.get(stage.key(name))
        if earlier is not None and earlier["success"] == "1":
            return False
    return True


# ---- results files --------------------------------------------------------------------------------------------

def row_key(row):
    return tuple(row[column] for column in KEY)


def read_rows(path):
    """The complete rows of a results file; a last line torn by a killed process (no newline) is ignored."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    reader = csv.DictReader(lines)
    if lines and tuple(reader.fieldnames or ()) != COLUMNS:
        raise UsageError(f"{path}: not the results of this script (other columns); run without --resume")
    return [row for row in reader if None not in row.values() and None not in row]


def finished_rows(out):
    """Rows of results.csv then of every shard, later ones winning, whose PNG is still on disk, by key."""
    rows = read_rows(out / "results.csv")
    for shard in sorted((out / SHARDS).glob("*.csv")):
        rows += read_rows(shard)
    return {row_key(row): row for row in rows if (out / row["file"]).is_file()}


def write_results(path, rows):
    with atomic_path(path) as temp, open(temp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def append_rows(path, rows):
    """Append to a rank's shard (created with its header on first use), flushed as each job finishes a batch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerows(rows)
        handle.flush()


def ordered(rows, photos, plan, batch_size):
    """One process's order: per batch, per job in plan order, the batch's photos in order; then any rows of an
    earlier run outside this plan, in their previous order."""
    image_index = {name: i for i, name in enumerate(photos.names)}
    job_index = {job: k for k, job in enumerate(plan.jobs)}

    def place(item):
        position, row = item
        i, k = image_index.get(row["image"]), job_index.get(job_of(row))
        return (0, i // batch_size, k, i) if i is not None and k is not None else (1, position)
    return [row for _, row in sorted(enumerate(rows), key=place)]


def start_output(out, args, context):
    """Rank 0 folds what earlier runs finished (--resume) into results.csv, or clears them; then every rank reads
    the finished rows. Shards start empty, so no rank appends after a line torn by a killed process."""
    if context.is_main:
        kept = list(finished_rows(out).values()) if args.resume else []
        if kept:
            write_results(out / "results.csv", kept)
        else:
            for name in ("results.csv", "summary.md", "robust_accuracy.csv"):
                (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / SHARDS, ignore_errors=True)
    distributed.barrier(context)
    return {row_key(row): row for row in read_rows(out / "results.csv")}


def merge_results(out, photos, plan, args):
    """Rank 0, after every rank finished: results.csv from the kept rows and every shard, in one process's order."""
    rows = ordered(list(finished_rows(out).values()), photos, plan, args.batch_size)
    write_results(out / "results.csv", rows)
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    return rows


# ---- streaming ------------------------------------------------------------------------------------------------

def evaluate(model, photos, plan, batches, done, out, args, context):
    """Decode each of this rank's batches that has work left and run every job on it before the next; rows go to
    this rank's shard as each job finishes. Returns the unreadable files met (name, reason)."""
    pending = [batch for batch in batches if any(needed(job, photos.names[i], plan, done)
                                                 for i in batch for job in plan.jobs)]
    dataset = PhotoDataset(photos.paths, load_image, get_image_transform(model.preprocessing))
    shard = out / SHARDS / f"results.rank-{context.rank}.csv"
    skipped = []
    desc = "evaluating" + (f" (rank {context.rank})" if context.world_size > 1 else "")
    with tqdm(total=sum(map(len, pending)), unit="image", desc=desc, position=context.local_rank) as bar:
        for items in photo_batches(dataset, pending, args.workers):
            batch, unreadable = decode_batch(model, photos, plan, items)
            for name, reason in unreadable:
                tqdm.write(f"skipped {name}: {reason}", file=sys.stderr)
            skipped += unreadable
            for job in plan.jobs:
                todo = [i for i in batch.members if needed(job, photos.names[i], plan, done)]
                if todo:
                    bar.set_postfix_str(f"{job.folder.removeprefix('images/')} {job.defense} {job.attack}")
                    rows = run_job(model, photos, plan, job, batch, todo, done, out, args)
                    append_rows(shard, rows)
                    done.update((row_key(row), row) for row in rows)
            bar.update(len(items))
    return skipped


# ---- summary.md, robust_accuracy.csv and figures --------------------------------------------------------------

def group_mean(rows, value):
    """The mean of value(row) over the photos, per job."""
    groups = {}
    for row in rows:
        groups.setdefault(job_of(row), []).append(value(row))
    return {job: sum(values) / len(values) for job, values in groups.items()}


def percent(rate):
    return f"{100 * rate:.1f}%"


def check_iterative_beats_one_step(rate, plan, args):
    iterative, one_step = iterative_methods(plan.methods), [m for m in plan.methods if not ATTACKS[m].iterative]
    text = "iterative attacks at least as strong as one-step ones (per epsilon)"
    if not iterative or not one_step:
        return None, text + ": needs a one-step method (fgsm) and an iterative one in --methods"
    cell = {(method, epsilon): rate[Job(method, epsilon, top_steps(method, args))]
            for method in plan.methods for epsilon in args.epsilons}
    ok = all(cell[m, epsilon] >= cell[f, epsilon] for m in iterative for f in one_step for epsilon in args.epsilons)
    parts = [f"epsilon {epsilon:g}: " + ", ".join(f"{m} {percent(cell[m, epsilon])}" for m in plan.methods)
             for epsilon in args.epsilons]
    return ok, f"{text}: " + "; ".join(parts)


def check_monotone(rate, plan, args):
    text = "success never falls as epsilon grows (per method, epsilon " + \
        ", ".join(f"{epsilon:g}" for epsilon in args.epsilons) + ")"
    if not plan.methods:
        return None, text + ": needs the --methods grid"
    parts = [f"{method} " + " -> ".join(percent(rate[Job(method, epsilon, top_steps(method, args))])
                                        for epsilon in args.epsilons) for method in plan.methods]
    ok = all(later >= earlier for method in plan.methods for earlier, later in
             pairwise(rate[Job(method, epsilon, top_steps(method, args))] for epsilon in args.epsilons))
    return ok, f"{text}: " + "; ".join(parts)


def check_converged(rate, plan, args):
    epsilon, steps = max(args.epsilons), max(args.steps)
    text = f"doubling the steps ({steps} -> {2 * steps}, epsilon {epsilon:g}) changes success by under 1 point"
    methods = iterative_methods(plan.methods)
    if not methods:
        return None, text + ": needs an iterative method in --methods"
    changes = {m: 100 * (rate[Job(m, epsilon, 2 * steps)] - rate[Job(m, epsilon, steps)]) for m in methods}
    parts = [f"{m} {percent(rate[Job(m, epsilon, steps)])} -> {percent(rate[Job(m, epsilon, 2 * steps)])} "
             f"({changes[m]:+.1f} points)" for m in methods]
    return all(abs(change) < 1 for change in changes.values()), f"{text}: " + "; ".join(parts)


def check_unbounded(rate, plan, args):
    steps = max(args.steps)
    text = f"an unbounded budget (pgd, epsilon 255, {steps} steps) reaches 100%"
    if not plan.methods:
        return None, text + ": needs the --methods grid"
    success = rate[Job("pgd", UNBOUNDED, steps)]
    return success == 1, f"{text}: {percent(success)}"


def check_gradient_free(rows, plan, args):
    """Square runs on the photos every earlier (gradient) attack failed on: if it fools any, gradients are masked or
    a gradient attack is broken (Carlini et al. 2019)."""
    text = "the gradient-free attack fools no image that the gradient attacks failed on (same epsilon)"
    checked = [stage for epsilon in args.epsilons for k, stage in enumerate(plan.stages_at(epsilon))
               if ATTACKS[stage.method].gradient_free
               and any(not ATTACKS[earlier.method].gradient_free for earlier in plan.stages_at(epsilon)[:k])]
    if not checked:
        gradient_free = " or ".join(name for name, attack in ATTACKS.items() if attack.gradient_free)
        return None, text + f": needs {gradient_free} after a gradient attack in --ensemble"
    parts, ok = [], True
    for stage in checked:
        attacked = [row for row in rows if job_of(row) == stage]
        fooled = sum(row["success"] == "1" for row in attacked)
        ok &= fooled == 0
        parts.append(f"epsilon {stage.epsilon:g}: {stage.method} fooled {fooled} of the {len(attacked)} images "
                     "the gradient attacks failed on")
    return ok, f"{text}: " + "; ".join(parts)


def robust_accuracy(rows, plan, args):
    """robust_accuracy.csv's rows: per epsilon, the accuracy after the ensemble's attacks 1..k (cumulative, as
    AutoAttack prints it), then the worst case over all of them. A photo misclassified when clean is not robust."""
    correct = {row["image"]: row["clean_correct"] == "1" for row in rows if job_of(row) == CLEAN}
    images = len(correct)
    fooled = {(job_of(row), row["image"]) for row in rows if row["attack"] == "ensemble" and row["success"] == "1"}
    table = []
    for epsilon in args.epsilons:
        robust = {name for name, ok in correct.items() if ok}
        for stage in plan.stages_at(epsilon):
            robust = {name for name in robust if (stage, name) not in fooled}
            table.append((epsilon, stage.method, len(robust)))
        table.append((epsilon, "worst-case", len(robust)))
    clean = sum(correct.values()) / images
    return [dict(zip(ACCURACY_COLUMNS, (f"{epsilon:g}", attack, images, f"{clean:.6g}", f"{robust / images:.6g}")))
            for epsilon, attack, robust in table]


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def accuracy_table(accuracy, plan, args):
    cell = {(row["epsilon"], row["attack"]): float(row["robust_accuracy"]) for row in accuracy}
    clean = float(accuracy[0]["clean_accuracy"])
    header = ("epsilon", "clean accuracy", *(f"robust accuracy after {m}" for m in plan.ensemble), "worst case")
    table = [(f"{epsilon:g}", percent(clean), *(percent(cell[f"{epsilon:g}", m]) for m in plan.ensemble),
              percent(cell[f"{epsilon:g}", "worst-case"])) for epsilon in args.epsilons]
    steps = ", ".join(f"{m} {stage_steps(m, args)} {budget_unit(m)}"
                      for m in plan.ensemble)
    return (f"## Robust accuracy ({accuracy[0]['images']} labelled photos; ensemble {steps})\n\n"
            + markdown_table(header, table) + "\n\n"
            "The attacks run in this order, each only on the photos every earlier one failed to fool (AutoAttack's "
            "flow); the accuracy after an attack is cumulative (after attacks 1..k, as AutoAttack prints it), so the "
            "last column is the per-image worst case. A photo misclassified when clean counts as not robust.\n")


def defense_table(rate, kept, plan, args):
    method, steps = defense_method(plan.methods), max(args.steps)
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


def run_facts(photos, args, context):
    """What a rerun needs to give the same bytes."""
    return (f"Run: batch size {args.batch_size}, {torch.get_num_threads()} torch thread(s) per process, "
            f"{context.world_size} process{'es' if context.world_size > 1 else ''}, {args.workers} loader workers, "
            f"seed {args.seed}, device {context.device}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}. The same inputs, seed, batch size and threads per process give "
            "the same bytes whatever the number of processes; another batch size or thread count changes floats, "
            "so verdicts may differ for images at the decision boundary.")


def summary_markdown(rows, rate, kept, accuracy, photos, plan, skipped, args, context):
    goal = f"targeted ({get_label(plan.target)})" if plan.target is not None else "untargeted"
    labels = (f"Labels: {photos.label_source}." if photos.labels else
              "No labels were given: the clean predictions stood in for them (untargeted success means leaving the "
              "clean prediction), so no accuracy is reported.")
    readable = len(photos.names) - len(skipped)
    grid = f"Goal of the --methods grid: {goal}. " if plan.methods else ""
    lines = [f"# Evaluation of {args.model} on {readable} photos from {args.folder}", "",
             f"{grid}Success is judged on each saved PNG read back from disk. "
             f"Epsilon in levels out of 255 (L-infinity). {labels}", "", run_facts(photos, args, context), ""]
    if skipped:
        lines += [f"{len(skipped)} unreadable files, left out of every rate:", ""]
        lines += [f"- skipped: {name} ({reason})" for name, reason in skipped] + [""]
    if accuracy:
        lines += [accuracy_table(accuracy, plan, args)]
    if plan.methods:
        header = ("method", "steps", *(f"eps {epsilon:g}" for epsilon in args.epsilons))
        table = [(m, top_steps(m, args), *(percent(rate[Job(m, e, top_steps(m, args))]) for e in args.epsilons))
                 for m in plan.methods]
        lines += [f"## Success rate per method and epsilon (at the largest steps, {max(args.steps)})", "",
                  markdown_table(header, table), ""]
    checks = [check(rate, plan, args) for check in (check_iterative_beats_one_step, check_monotone,
                                                   check_converged, check_unbounded)]
    checks.append(check_gradient_free(rows, plan, args))
    verdicts = {True: "PASS", False: "FAIL", None: "N/A"}
    lines += ["## Sanity checks (Carlini et al. 2019, \"On Evaluating Adversarial Robustness\")", ""]
    lines += [f"{number}. **{verdicts[ok]}** {text}" for number, (ok, text) in enumerate(checks, 1)]
    if args.defenses:
        lines += ["", defense_table(rate, kept, plan, args)]
    return "\n".join(lines).rstrip() + "\n"


def figures(rate, kept, plan, args):
    """{file name: figure}: success against epsilon and steps per method, and through each defense."""
    if not plan.methods:
        return {}
    methods, epsilon, steps = plan.methods, max(args.epsilons), max(args.steps)
    # bars, not lines: attacks that all reach 100% (or 0%) would hide each other's lines
    series = [(m, {"color": f"C{k}"}) for k, m in enumerate(methods)]  # a method's colour is the same in both
    by_epsilon = {(f"{e:g}", m): rate[Job(m, e, top_steps(m, args))] for e in args.epsilons for m in methods}
    all_steps = [*args.steps, 2 * steps]
    by_steps = {(str(s), m): rate[Job(m, epsilon, s)] if ATTACKS[m].iterative or s == 1 else None
                for s in all_steps for m in methods}
    result = {"success_vs_epsilon.png": grouped_bars_figure(
                  [("", by_epsilon)], [f"{e:g}" for e in args.epsilons], series, "attack success rate (%)",
                  f"success per epsilon (levels out of 255), at the largest steps ({steps}; fgsm: 1)"),
              "success_vs_steps.png": grouped_bars_figure(
                  [("", by_steps)], [str(s) for s in all_steps], series, "attack success rate (%)",
                  f"success per number of steps, at epsilon {epsilon:g} (fgsm: one step only)")}
    if args.defenses:
        method = defense_method(methods)
        attacks = ("plain", "adaptive") if args.adaptive else ("plain",)
        series = [("clean accuracy kept", {"color": "0.6"})] + \
            [(f"{attack} {method} success", {"color": "C0" if attack == "plain" else "C3"}) for attack in attacks]
        panels = []
        for epsilon in args.epsilons:
            values = {}
            for defense in args.defenses:
                values[defense, series[0][0]] = kept[Job(method, epsilon, steps, defense)]
                for attack, (name, _) in zip(attacks, series[1:]):
                    values[defense, name] = rate[Job(method, epsilon, steps, defense, attack)]
            panels.append((f"epsilon {epsilon:g}", values))
        result["defenses.png"] = grouped_bars_figure(
            panels, list(args.defenses), series, "% of photos",
            f"{method}, {steps} steps: judged on the PNG read back, through the real defense")
    return result


def write_report(rows, photos, plan, skipped, out, args, context):
    """summary.md, robust_accuracy.csv (with the ensemble) and the figures, from this plan's rows."""
    jobs, names = set(plan.jobs), set(photos.names)
    rows = [row for row in rows if job_of(row) in jobs and row["image"] in names]
    rate = group_mean(rows, lambda row: int(row["success"]))
    kept = group_mean(rows, lambda row: int(row["clean_defended_label"] == row["clean_label"]))
    accuracy = robust_accuracy(rows, plan, args) if plan.ensemble else []
    if accuracy:
        with atomic_path(out / "robust_accuracy.csv") as temp, open(temp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ACCURACY_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(accuracy)
    summary = save_text(summary_markdown(rows, rate, kept, accuracy, photos, plan, skipped, args, context),
                        out / "summary.md")
    for name, figure in figures(rate, kept, plan, args).items():
        save_figure(figure, out / name)
        plt.close(figure)
    return summary, len(rows)


def main(args):
    context = distributed.start(get_device(args.device))
    try:
        torch.set_num_threads(distributed.thread_share(args.threads, context))
        torch.manual_seed(args.seed)
        photos = find_photos(args)
        plan = make_plan(args, photos.labels is not None)
        model = prepare_model(args, context.device)
        batches = distributed.deal(cut(len(photos.paths), args.batch_size), context)
        if args.strict:
            check_readable(photos, batches, context)
        out = Path(args.output_dir)
        done = start_output(out, args, context)
        started = time.perf_counter()
        skipped = evaluate(model, photos, plan, batches, done, out, args, context)
        order = {name: i for i, name in enumerate(photos.names)}
        skipped = sorted((item for found in distributed.gather(skipped, context) for item in found),
                         key=lambda item: order[item[0]])
        seconds, readable = time.perf_counter() - started, len(photos.names) - len(skipped)
        if not readable:
            raise UsageError(f"{args.folder}: no readable image ({len(skipped)} files, none could be decoded)")
        if context.is_main:
            rows = merge_results(out, photos, plan, args)
            summary, count = write_report(rows, photos, plan, skipped, out, args, context)
            print(summary.read_text())
            print(f"Evaluated {readable} photos in {seconds:.2f} s ({readable / seconds:.3f} photos/s), "
                  f"{context.world_size} process(es) x {torch.get_num_threads()} thread(s)")
            print(f"Wrote {count} rows to {out / 'results.csv'}, {summary} and the figures in {out}")
    finally:
        distributed.stop(context)


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


def ensemble_list(text):
    """--ensemble: attack names in order (checked against utils.attacks once the plan is made), or none."""
    return [] if text.strip() == "none" else listed(str, "--ensemble")(text)


def get_args_parser():
    parser = ArgumentParser(description="Evaluate attacks (and defenses) on a folder of photos, with sanity checks "
                                        "and, given true labels, robust accuracy.")
    parser.add_argument("folder", help="a folder of photos, or an ImageFolder tree (one subfolder per class)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"torchvision classifier or {OFFLINE_MODEL} (default: %(default)s)")
    parser.add_argument("--labels", help=f"true labels: {IMAGENET_VAL} (ILSVRC2012_val_NNNNNNNN.JPEG names) or a CSV "
                                         "file with columns image,label (index, WordNet ID or class name); "
                                         "default: the ImageFolder subfolders if any")
    parser.add_argument("--methods", type=listed(one_of(ATTACKS, "method"), "--methods"), default=None,
                        help=f"the grid's attacks, from {', '.join(ATTACKS)} (default: {','.join(DEFAULT_METHODS)}; "
                             "with labels, no grid unless given)")
    epsilon = number_in(0, 255, low_open=True, name="--epsilons")
    parser.add_argument("--epsilons", type=listed(epsilon, "--epsilons", True), default="1,2,4,8,16",
                        help="L-infinity budgets in levels, each in (0, 255] (default: %(default)s)")
    parser.add_argument("--steps", type=listed(number_in(1, 100000, int, name="--steps"), "--steps", True),
                        default="1,5,10,20,50", help="steps of the iterative methods, each >= 1 (default: %(default)s)")
    parser.add_argument("--target", help="class index or name the grid aims at (default without labels: 1, goldfish)")
    parser.add_argument("--untargeted", action="store_true", help="any class but the true one (default with labels)")
    parser.add_argument("--ensemble", type=ensemble_list, default=None,
                        help=f"attacks for robust accuracy, in order, or none (default with labels: "
                             f"{','.join(DEFAULT_ENSEMBLE)})")
    parser.add_argument("--queries", type=number_in(1, 10 ** 6, int, name="--queries"), default=5000,
                        help="query budget of a gradient-free ensemble attack (default: %(default)s, AutoAttack's)")
    parser.add_argument("--target-classes", type=number_in(1, 999, int, name="--target-classes"), default=9,
                        help="classes apgd-t runs towards (default: %(default)s)")
    parser.add_argument("--no-early-stop", action="store_true",
                        help="attack every image for all its steps (fixed work per image, for benchmarks)")
    parser.add_argument("--batch-size", type=number_in(1, 4096, int, name="--batch-size"), default=16)
    parser.add_argument("--workers", type=number_in(0, 64, int, name="--workers"), default=0,
                        help="DataLoader processes decoding photos (default: %(default)s, in the main process)")
    parser.add_argument("--threads", type=number_in(1, 1024, int, name="--threads"), default=None,
                        help="torch threads per process (default: the cores divided among this machine's processes)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--output-dir", default="outputs/eval", help="(default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="keep the finished rows of an earlier run, do the rest")
    parser.add_argument("--strict", action="store_true", help="an unreadable file is an error (default: skipped)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--defenses", type=listed(one_of(DEFENSES, "defense"), "--defenses"), default=[],
                        help=f"also judge through these defenses (default parameters): {', '.join(DEFENSES)}")
    parser.add_argument("--adaptive", action="store_true", help="also attack through each defense (BPDA, EOT)")
    parser.add_argument("--eot", type=number_in(1, 1000, int, name="--eot"), default=1,
                        help="random draws of the defense averaged per adaptive step (default: %(default)s)")
    speed.add_speed_arguments(parser, compile=True)
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
