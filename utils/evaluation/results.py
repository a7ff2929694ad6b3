"""The results files of step 8: results.csv (one row per photo and job, in the order one process writes them), the
per-rank shards that ranks append to as each job finishes a batch, and --resume.

Public surface: COLUMNS and KEY (a row's columns and identity), row_key, shard_path, append_rows (a rank's shard),
start_output (what earlier runs finished, folded into results.csv or cleared) and merge_results (rank 0: every shard
merged into results.csv in one process's order). A line torn by a killed process is never read as a row, and a row
counts as finished only while its PNG is on disk.

results.csv has one row per photo and job that ran; norm is the run's threat model (epsilon is in its units: levels
in Linf, [0, 1] pixel units in L2 and L1); linf (levels), l2 (pixels in [0, 1]) and size (the norm's own, in its
units) compare the PNG read back with the prepared original; distance is FAB's smallest adversarial perturbation
found, in the norm's units ("inf": none found; it may exceed epsilon, and the PNG is then the original), empty for
the other attacks; seconds is the attack's time per image. --resume keeps the finished rows of results.csv
and of every shard, whatever number of processes wrote them, and the run does only the rest; evaluation.json
records the model and settings that made them, and --resume refuses rows made with others.
"""
import contextlib
import csv
import shutil

from utils.evaluation import distributed
from utils.cli import UsageError
from utils.files import append_csv, atomic_path, check_same_settings, remove_killed_writes, save_settings
from utils.evaluation.plan import job_of

COLUMNS = ("image", "method", "norm", "epsilon", "steps", "defense", "attack", "target", "label", "clean_label",
           "clean_correct", "final_label", "defended_label", "clean_defended_label", "success", "steps_used", "linf",
           "l2", "size", "distance", "seconds", "file")  # file last: a row torn mid-append names no PNG, so --resume drops it
KEY = ("image", "method", "epsilon", "steps", "defense", "attack")
SHARDS = "shards"
SETTINGS_NAME = "evaluation.json"  # what made results.csv's rows (recorded_settings), for --resume


def row_key(row):
    return tuple(row[column] for column in KEY)


def shard_path(out, rank):
    """The file rank `rank` appends its rows to."""
    return out / SHARDS / f"results.rank-{rank}.csv"


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
        raise UsageError(f"{path}: not the results of this script (other columns); run without `resume`", "resume")
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
    append_csv(path, rows, COLUMNS)


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


def check_norm(rows, norm, out):
    """--resume keeps rows of this run's threat model only: a budget of 8 means something else in another norm, so
    rows of another norm are refused rather than reused or mixed."""
    other = sorted({row["norm"] for row in rows} - {norm})
    if other:
        raise UsageError(f"{out / 'results.csv'}: holds {other[0]} results, not {norm}; resume with `norm` {other[0]} "
                         "or use another `output_dir`", "norm", "output_dir")


def recorded_settings(settings, model_digest):
    """What decides a row besides its key: the model (utils.models.weights_digest) and the settings an attack draws or
    stops by. The batching, threads and memory format only move floats (the README's reproducibility line), so a run
    may resume with others."""
    restarts = {} if settings.restarts is None else {"restarts": settings.restarts}  # the files of older runs had none
    return {"model": model_digest, "norm": settings.norm, "seed": settings.seed, "queries": settings.queries,
            "target_classes": settings.target_classes, "eot": settings.eot, "early_stop": settings.early_stop,
            "precision": settings.precision, **restarts}


def start_output(out, settings, context, model_digest):
    """Rank 0 folds what earlier runs finished (--resume) into results.csv, or clears them, and records what makes
    the rows (recorded_settings, in evaluation.json: --resume refuses rows made otherwise, before anything is
    written); then every rank reads the finished rows. Shards start empty, so no rank appends after a line torn by a
    killed process, and a killed process's temp files go (the other ranks wait at the barrier: none is writing)."""
    if context.is_main:
        remove_killed_writes(out)
        kept = list(finished_rows(out).values()) if settings.resume else []
        recorded = recorded_settings(settings, model_digest)
        if kept:
            check_norm(kept, settings.norm, out)
            check_same_settings(out / SETTINGS_NAME, recorded, out / "results.csv")
            write_results(out / "results.csv", kept)
        else:
            for name in ("results.csv", "summary.md", "robust_accuracy.csv"):
                (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / SHARDS, ignore_errors=True)
        save_settings(recorded, out / SETTINGS_NAME)
    distributed.barrier(context)
    return {row_key(row): row for row in read_rows(out / "results.csv")}


def drop_empty_output(out, made_folder):
    """Rank 0, when a run wrote no row: the settings record goes, and the folder too if this run `made_folder` and
    nothing else is in it, so a refused run leaves no output behind (and a folder the user made stays)."""
    if not read_rows(out / "results.csv"):
        (out / SETTINGS_NAME).unlink(missing_ok=True)
        if made_folder:
            with contextlib.suppress(OSError):
                out.rmdir()


def merge_results(out, photos, plan, settings):
    """Rank 0, after every rank finished: results.csv from the kept rows and every shard, in one process's order."""
    rows = ordered(list(finished_rows(out).values()), photos, plan, settings.batch_size)
    write_results(out / "results.csv", rows)
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    return rows
