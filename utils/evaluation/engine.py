"""The engine of an evaluation (step 8): the photos, in sorted order, cut into batches of `batch_size` that a
DataLoader (`workers`) decodes one at a time; each batch runs every job of the plan before the next is read, so memory
stays flat however large the folder. Every adversarial image is saved as a PNG under OUTPUT/images/ and judged on that
file read back from disk (through the real defense, with the judge's own seed, if any). Rows go to this rank's shard
as each job finishes a batch; under torchrun batch k runs on rank k % world size (utils/evaluation/distributed.py),
and rank 0 merges every shard into results.csv and writes the report.

`run_evaluation(model, photos, plan, settings, out)` is the entry point; step 8, the benchmarks and the tests call it.
The loop over a batch's jobs (run_batch) is the one utils.evaluation.robust_accuracy runs too, with its images kept in
memory (MemoryStore) where step 8 writes PNGs (PngStore).
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from utils.adaptive import JUDGE_SEED_OFFSET, defended_forward
from utils.attacks import goal_reached, make_attack, perturbation_size
from utils.cli import UsageError
from utils.data import PhotoDataset, cut, photo_batches
from utils.defenses import make_defense
from utils.evaluation import distributed
from utils.evaluation.interval import certify_photos
from utils.evaluation.plan import CLEAN, Job, stage_options
from utils.evaluation.report import write_report
from utils.evaluation.results import (COLUMNS, KEY, append_rows, drop_empty_output, merge_results, row_key, shard_path,
                                      start_output)
from utils.files import save_image
from utils.images import load_image, to_tensor, to_uint8
from utils.models import get_image_transform, predict_images, prepare_image, weights_digest
from utils.threat import size_text


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


def attack_options(job, plan, settings):
    """The one place an attack's options are built (every attack drops the ones it does not take); an ensemble
    stage gets AutoAttack's settings for the run's norm (utils.evaluation.plan.stage_options)."""
    options = dict(epsilon=job.epsilon, steps=job.steps, targeted=plan.target is not None and job.attack != "ensemble",
                   seed=settings.seed, eot=settings.eot, early_stop=settings.early_stop, queries=settings.queries,
                   target_classes=settings.target_classes, precision=settings.precision, norm=settings.norm)
    if job.attack == "ensemble":
        options.update(stage_options(job.method, settings))
    return options


def run_attack(model, method, images_u8, labels, ids=None, **options):
    """utils.attacks.run_attack (adversarial 8-bit images, steps each used), plus each image's distance: FAB's
    smallest adversarial perturbation found, in the norm's units (None for an attack that reports none)."""
    device = model.mean.device
    attack = make_attack(method, model, **options)
    result = attack(to_tensor(images_u8, device), torch.tensor(labels, device=device), ids)
    distance = None if result.distance is None else result.distance.tolist()
    return to_uint8(result.adversarial), result.steps_used.tolist(), distance


def attack_batch(model, plan, job, batch, todo, settings):
    """Adversarial 8-bit images for the photos `todo` (indices into the photo list), the steps each used and each
    one's distance (FAB's; None for other attacks). The
    indices are the photos' ids for the attack: Square draws per id, so a photo gets the same whatever batch, rank or
    resumed run it falls in."""
    if job.attack == "clean":
        return [batch.originals[i] for i in todo], [0] * len(todo), None
    forward = None
    if job.attack == "adaptive":
        forward = defended_forward(model, make_defense(job.defense, seed=settings.seed))
    adversarial, steps_used, *distance = run_attack(model, job.method, [batch.originals[i] for i in todo],
                                                    [batch.goals[i] for i in todo], ids=todo, forward=forward,
                                                    **attack_options(job, plan, settings))
    return adversarial, steps_used, distance[0] if distance else None


def judge_batch(model, plan, job, batch, todo, back, settings):
    """Classify the 8-bit images `back` of the photos `todo` (step 8: its saved PNGs read back; the library call:
    the attack's images on the same 8-bit lattice, the same pixels) and through the real defense, with the judge's
    own seed: a dict of columns per photo, and each image's size in the norm's units (float64, unrounded)."""
    originals = [batch.originals[i] for i in todo]
    final = predict_images(model, back)
    linf, l2 = perturbation_size(to_tensor(back), to_tensor(originals))
    size = perturbation_size(to_tensor(back), to_tensor(originals), settings.norm)
    defended = clean_defended = [""] * len(todo)
    if job.defense != "none":
        judge = make_defense(job.defense, seed=settings.seed + JUDGE_SEED_OFFSET)
        defended = predict_images(model, [judge(image) for image in back])
        clean_defended = predict_images(model, [judge(image) for image in originals])
    verdict = final if job.defense == "none" else defended
    untargeted = plan.target is None or job.attack == "ensemble"
    columns = [{"final_label": final[k], "defended_label": defended[k], "clean_defended_label": clean_defended[k],
                "success": int(goal_reached(verdict[k], batch.goals[i], untargeted)),
                "linf": int(linf[k]), "l2": f"{l2[k]:.4f}", "norm": settings.norm,
                "size": size_text(size[k], settings.norm, 4)} for k, i in enumerate(todo)]
    return columns, size


class PngStore:
    """Step 8's images: each saved as OUT/JOB_FOLDER/STEM.png and judged on that file read back, as a receiver would
    (resized and cropped as the model reads a photo, which leaves an image of the model's size as it is)."""

    def __init__(self, out, photos, model):
        self.out, self.photos, self.model = Path(out), photos, model

    def path(self, job, index):
        return self.out / job.folder / f"{self.photos.stems[index]}.png"

    def save(self, job, todo, images):
        for index, image in zip(todo, images):
            save_image(image, self.path(job, index))

    def read(self, job, todo):
        return [prepare_image(self.path(job, index), self.model) for index in todo]

    def file(self, job, index):
        """results.csv's file column: the PNG's path inside OUT."""
        return self.path(job, index).relative_to(self.out).as_posix()


class MemoryStore:
    """The library call's images: kept in memory and judged as they are (a PNG holds the same 8 bits); no files."""

    def __init__(self):
        self.images = {}

    def save(self, job, todo, images):
        self.images.update(((job.folder, index), image) for index, image in zip(todo, images))

    def read(self, job, todo):
        return [self.images[job.folder, index] for index in todo]

    def file(self, job, index):
        return ""


@dataclass
class Stage:
    """One job run on the photos `todo` of a batch: the 8-bit images judged (one per photo), each one's size in the
    norm's units (float64), its distance (FAB's smallest adversarial perturbation; None for an attack that reports
    none) and whether it reached the goal."""
    job: Job
    todo: list
    images: list
    sizes: torch.Tensor
    distances: list
    success: list


def run_job(model, photos, plan, job, batch, todo, done, settings, store):
    """`job` on the photos `todo` of `batch`: attacked (attack_batch), kept and read back by `store` (PngStore,
    MemoryStore), judged (judge_batch). Returns the Stage and its rows, results.csv's columns as strings. A defense's
    plain job attacks nothing: it judges the plain attack's images, already judged bare, through the defense."""
    started = time.perf_counter()
    if job.makes_images:
        adversarial, steps_used, distances = attack_batch(model, plan, job, batch, todo, settings)
        store.save(job, todo, adversarial)
    else:
        bare = Job(job.method, job.epsilon, job.steps)
        steps_used = [done[bare.key(photos.names[i])]["steps_used"] for i in todo]
        distances = [done[bare.key(photos.names[i])]["distance"] or None for i in todo]
    distances = distances or [None] * len(todo)
    seconds = (time.perf_counter() - started) / len(todo) if job.makes_images and job.attack != "clean" else 0.0
    back = store.read(job, todo)
    judged, sizes = judge_batch(model, plan, job, batch, todo, back, settings)
    rows = []
    for i, steps, distance, columns in zip(todo, steps_used, distances, judged):
        label = photos.labels[i] if photos.labels else ""
        row = dict(zip(KEY, job.key(photos.names[i])), target="" if plan.target is None else plan.target,
                   label=label, clean_label=batch.clean[i],
                   clean_correct="" if label == "" else int(batch.clean[i] == label), steps_used=steps,
                   seconds=f"{seconds:.3f}", file=store.file(job, i),
                   distance=format_distance(distance, settings.norm), **columns)
        rows.append({column: str(row[column]) for column in COLUMNS})
    stage = Stage(job, todo, back, sizes, [None if d is None else float(d) for d in distances],
                  [columns["success"] == 1 for columns in judged])
    return stage, rows


def run_batch(model, photos, plan, batch, done, settings, store, starting=None):
    """The one loop of an evaluation, step 8's and the library call's (utils/evaluation/robust.py): every job of
    `plan`, in order, on the photos of `batch` it still runs on (still_to_run), as run_job runs it; each job's rows
    go into `done` before the next job asks which photos it runs on. `starting(job)`, if given, is told before each
    job runs. Yields (Stage, rows) per job that ran."""
    for job in plan.jobs:
        todo = still_to_run(job, batch.members, photos, plan, done)
        if todo:
            if starting:
                starting(job)
            stage, rows = run_job(model, photos, plan, job, batch, todo, done, settings, store)
            done.update((row_key(row), row) for row in rows)
            yield stage, rows


def format_distance(distance, norm):
    """The distance column: "" for an attack that reports none, "inf" where FAB found no adversarial image, else the
    size in the norm's units (levels in Linf, a whole number there)."""
    if distance is None or distance == "":
        return ""
    distance = float(distance)
    if distance == float("inf"):
        return "inf"
    return size_text(distance, norm, 4)


def runs_on(job, name, plan, done):
    """Whether `job` runs on photo `name`, given the earlier jobs' rows: every job does but an ensemble stage, which
    runs only on a photo correctly classified when clean that no earlier stage (same epsilon) fooled."""
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


def still_to_run(job, batch, photos, plan, done):
    """The photos of `batch` that `job` runs on now: none when each has its row already, else all of them. A batch
    recorded in part (a kill mid-append, a PNG deleted) runs again whole, so each photo keeps the batch it has in an
    uninterrupted run: on CPU another batch composition gives other floats."""
    runs = [i for i in batch if runs_on(job, photos.names[i], plan, done)]
    return [] if all(job.key(photos.names[i]) in done for i in runs) else runs


def evaluate(model, photos, plan, batches, done, out, settings, context):
    """Decode each of this rank's batches that has work left and run every job on it before the next; rows go to
    this rank's shard as each job finishes. Returns the unreadable files met (name, reason) and how many photos the
    batches with work left held."""
    pending = [batch for batch in batches if any(still_to_run(job, batch, photos, plan, done) for job in plan.jobs)]
    dataset = PhotoDataset(photos.paths, load_image, get_image_transform(model.preprocessing))
    shard = shard_path(out, context.rank)
    skipped = []
    store = PngStore(out, photos, model)
    desc = "evaluating" + (f" (rank {context.rank})" if context.world_size > 1 else "")
    with tqdm(total=sum(map(len, pending)), unit="image", desc=desc, position=context.local_rank) as bar:
        def announce(job):
            bar.set_postfix_str(f"{job.folder.removeprefix('images/')} {job.defense} {job.attack}")

        for items in photo_batches(dataset, pending, settings.workers):
            batch, unreadable = decode_batch(model, photos, plan, items)
            for name, reason in unreadable:
                tqdm.write(f"skipped {name}: {reason}", file=sys.stderr)
            skipped += unreadable
            for _, rows in run_batch(model, photos, plan, batch, done, settings, store, announce):
                append_rows(shard, rows)
            bar.update(len(items))
    return skipped, sum(map(len, pending))


def check_readable(paths, batches, context):
    """--strict: every file of every rank decodes, before anything is written; else the first bad one is an error."""
    failure = None
    # no bar off a terminal: its leftovers would precede the one-line error in a log
    for index in tqdm([i for batch in batches for i in batch], unit="image", desc="checking", leave=False,
                      disable=None):
        try:
            load_image(paths[index])
        except UsageError as error:
            failure = (index, str(error))
            break
    failures = [found for found in distributed.gather(failure, context) if found]
    if failures:
        raise UsageError(min(failures)[1] + " (--strict)")  # the flag itself: step 8 alone calls this, for it


@dataclass
class Evaluation:
    """What a run did: its rows (rank 0: every row of results.csv, in one process's order; other ranks: none), the
    unreadable files met (name, reason), how many photos had work left, the readable ones, the seconds the attacks
    took, and (rank 0) the summary.md written and the number of rows it reports on."""
    rows: list
    skipped: list
    attacked: int
    readable: int
    seconds: float
    summary: Path = None
    reported: int = 0


def run_evaluation(model, photos, plan, settings, out, context=None, certifiers=None):
    """Evaluate `model` on `photos` (utils.data.find_photos) as `plan` says, with `settings` (utils.evaluation.plan),
    writing into the folder `out`: the PNGs, results.csv (kept from an earlier run with settings.resume), then on
    rank 0 summary.md, robust_accuracy.csv and the figures. `context`: this process's place in a torchrun
    (utils.evaluation.distributed.start; default: one process on the model's device). `certifiers` ({name: a step
    10 certifier}, one process only): after the attacks, each certifies the same photos and epsilons, and the report
    gives robust accuracy as an interval (utils/evaluation/interval.py)."""
    context = context or distributed.Context(device=str(model.mean.device))
    if certifiers and context.world_size > 1:
        raise UsageError("`certify` runs in one process: run it without torchrun (or `resume` it so afterwards)",
                         "certify", "resume")
    out = Path(out)
    made_folder = not out.exists()
    batches = distributed.deal(cut(len(photos.paths), settings.batch_size), context)
    done = start_output(out, settings, context, weights_digest(model))
    started = time.perf_counter()
    skipped, attacked = evaluate(model, photos, plan, batches, done, out, settings, context)
    attacked = sum(distributed.gather(attacked, context))
    order = {name: i for i, name in enumerate(photos.names)}
    skipped = sorted((item for found in distributed.gather(skipped, context) for item in found),
                     key=lambda item: order[item[0]])
    seconds, readable = time.perf_counter() - started, len(photos.names) - len(skipped)
    if not readable:
        if context.is_main:
            drop_empty_output(out, made_folder)
        raise UsageError(f"{photos.folder}: no readable image ({len(skipped)} files, none could be decoded)")
    result = Evaluation([], skipped, attacked, readable, seconds)
    if context.is_main:
        result.rows = merge_results(out, photos, plan, settings)
        certified = certify_photos(certifiers, model, photos, skipped, settings.epsilons, settings.norm, out,
                                   settings.resume) \
            if certifiers else None
        result.summary, result.reported = write_report(result.rows, photos, plan, skipped, out, settings, context,
                                                       certified)
    return result
