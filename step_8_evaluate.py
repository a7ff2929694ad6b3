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

How it works, in the order of this file. The plan: with true labels (an ImageFolder tree, --labels imagenet-val or
--labels FILE.csv) the ensemble measures robust accuracy: a "clean" row per photo, then per epsilon the attacks of
--ensemble in order, each on the photos correctly classified when clean that every earlier attack failed to fool
(AutoAttack's flow). The grid (--methods, the default without labels or with --defenses) runs every method x epsilon x
steps, the sanity checks' extra runs (twice the largest steps; pgd unbounded at epsilon 255) and, with --defenses,
the attack judged through each defense (with --adaptive also BPDA(+EOT) through it). The loop: photos, in sorted order,
are cut into batches of --batch-size that a DataLoader (--workers) decodes one at a time; each batch runs every job
before the next is read, so memory stays flat however large the folder. Every adversarial image is saved as a PNG
under OUTPUT_DIR/images/ and judged on that file read back from disk (through the real defense, if any).

Under torchrun, batch k runs on rank k % world size. The results files (results.csv, the shards, --resume) are
utils/results.py's; summary.md, robust_accuracy.csv, the sanity checks and the figures are utils/report.py's.
Unreadable files are named on stderr, listed in summary.md and left out of every rate; --strict makes the first one
an error.

Reproducibility: the same inputs, seed, --batch-size and threads per process give the same bytes, whatever the
number of processes; another batch size or thread count gives other floats on CPU, hence the same verdicts except for
images at the decision boundary.
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from step_2_pretrained import (DEFAULT_MODEL, OFFLINE_MODEL, find_class, get_device, get_image_transform, load_image,
                               load_model, predict_images, prepare_image, to_tensor)
from utils import distributed, speed
from utils.adaptive import JUDGE_SEED_OFFSET, defended_forward
from utils.attacks import ATTACKS, goal_reached, perturbation_size, run_attack
from utils.cli import ArgumentParser, UsageError, listed, number_in, one_of, run
from utils.data import IMAGENET_VAL, PhotoDataset, check_readable, cut, find_photos, photo_batches
from utils.defenses import DEFENSES, make_defense
from utils.files import save_image
from utils.plan import CLEAN, UNBOUNDED, Job, Plan, defense_method, iterative_methods, stage_steps
from utils.report import write_report
from utils.results import KEY, COLUMNS, append_rows, merge_results, row_key, shard_path, start_output

DEFAULT_METHODS = ("fgsm", "pgd", "mifgsm")
DEFAULT_ENSEMBLE = ("apgd", "apgd-t", "square")


# ---- the plan -------------------------------------------------------------------------------------------------

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

def prepare_model(args, device):
    """The one place the model is made ready: --precision checked, --memory-format set, --compile applied."""
    return speed.prepare_model(load_model(args.model, device), args, args.batch_size, device)


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


# ---- streaming ------------------------------------------------------------------------------------------------

def evaluate(model, photos, plan, batches, done, out, args, context):
    """Decode each of this rank's batches that has work left and run every job on it before the next; rows go to
    this rank's shard as each job finishes. Returns the unreadable files met (name, reason)."""
    pending = [batch for batch in batches if any(needed(job, photos.names[i], plan, done)
                                                 for i in batch for job in plan.jobs)]
    dataset = PhotoDataset(photos.paths, load_image, get_image_transform(model.preprocessing))
    shard = shard_path(out, context.rank)
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


def main(args):
    context = distributed.start(get_device(args.device))
    try:
        torch.set_num_threads(distributed.thread_share(args.threads, context))
        torch.manual_seed(args.seed)
        photos = find_photos(args.folder, args.labels, find_class)
        plan = make_plan(args, photos.labels is not None)
        model = prepare_model(args, context.device)
        batches = distributed.deal(cut(len(photos.paths), args.batch_size), context)
        if args.strict:
            check_readable(photos.paths, batches, load_image, context)
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
