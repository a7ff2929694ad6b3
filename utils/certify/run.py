"""Certifying a list of images and writing step 10's outputs: certified.csv (one row per image and epsilon, appended
as each image finishes, so --resume keeps them), the counterexamples as PNGs (each read back and checked: the model
classifies the file wrong and it is within the budget), summary.md (certified accuracy per epsilon) and a figure.

Library entry points (step 8 calls them too): `certify_images(certifier, images_u8, labels, epsilons, ...)` -> rows,
`write_certify_report(rows, out, ...)`, `start_certified(out, columns, resume, settings)` -> the rows kept,
`finished_earlier(certifier, out, names, epsilons, resume)` -> the images an earlier run finished,
`sort_certified(out, columns, names)` -> the rows in the images' order, `check_epsilons(epsilons, norm)` -> them
sorted.
"""
import csv
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.certify.base import MISCLASSIFIED, NOT_ROBUST, ROBUST, UNKNOWN
from utils.certify.bounds_certifier import model_logits
from utils.certify.exact import within_budget
from utils.cli import UsageError
from utils.files import (append_csv, atomic_path, check_same_settings, remove_killed_writes, remove_killed_writes_of,
                         save_figure, save_image, save_settings, save_text)

BASE_COLUMNS = ("image", "label", "epsilon", "verdict", "prediction", "seconds")
CSV_NAME = "certified.csv"
SETTINGS_NAME = "certify.json"  # what made its rows (Certifier.recorded_settings)
FOLDER = "counterexamples"


def csv_columns(certifier):
    """certified.csv's columns: file last, so a row torn mid-append names no PNG."""
    return BASE_COLUMNS + tuple(certifier.columns) + ("file",)


def read_certified(path, columns):
    """The complete rows of certified.csv; a last line torn by a killed process (no newline) is ignored."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    reader = csv.DictReader(lines)
    if lines and tuple(reader.fieldnames or ()) != tuple(columns):
        raise UsageError(f"{path}: made by another method or version (other columns); run without `resume`",
                         "resume")
    return [row for row in reader if None not in row.values() and None not in row]


def write_certified(path, rows, columns):
    with atomic_path(path) as temp, open(temp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def start_certified(out, columns, resume, settings):
    """The rows an earlier run finished (--resume; a counterexample row only while its PNG is there), written back
    as certified.csv; without --resume the earlier outputs are removed. `settings` (Certifier.recorded_settings) are
    written beside them; --resume refuses rows made with other ones, before anything is written. A killed run's
    temp files go (remove_killed_writes): they are no output."""
    path = out / CSV_NAME
    remove_killed_writes_of([path, out / SETTINGS_NAME, out / "summary.md", out / "certified_accuracy.png"])
    remove_killed_writes(out / FOLDER)
    kept = [row for row in read_certified(path, columns) if not row["file"] or (out / row["file"]).is_file()] \
        if resume else []
    if kept:
        check_same_settings(out / SETTINGS_NAME, settings, path)
        write_certified(path, kept, columns)
    else:
        path.unlink(missing_ok=True)
    if not resume:
        for name in ("summary.md", "certified_accuracy.png"):
            (out / name).unlink(missing_ok=True)
        for old in (out / FOLDER).glob("*.png") if (out / FOLDER).is_dir() else []:
            old.unlink()
    save_settings(settings, out / SETTINGS_NAME)
    return kept


def check_epsilons(epsilons, norm, name="epsilons"):
    """`epsilons` ascending, once each is a budget of `norm`: in [0, 255] levels in L-infinity, at least 0 in L1 and
    L2 (UsageError naming the first that is not, and the parameter `name`; 0 certifies the image itself)."""
    high = 255 if norm == "Linf" else float("inf")
    bad = [epsilon for epsilon in epsilons if not 0 <= epsilon <= high]
    if bad:
        raise UsageError(f"`{name}` {bad[0]:g}: a {norm} budget must be in [0, {high:g}]", name)
    return sorted(epsilons)


def finished(kept, names, wanted):
    """The images of `names` an earlier run finished: its kept rows cover every epsilon (as text) of `wanted`."""
    covered = {}
    for row in kept:
        covered.setdefault(row["image"], set()).add(row["epsilon"])
    return {name for name in names if covered.get(name, set()) >= set(wanted)}


def finished_earlier(certifier, out, names, epsilons, resume):
    """certified.csv under `out` started for `certifier` (start_certified: an earlier run's rows kept with `resume`,
    else removed), and the images of `names` those rows finish at every one of `epsilons` (a certifier with a radius
    per image: its one row): the images a run skips. Step 10 and step 8's --certify resume this way."""
    kept = start_certified(out, csv_columns(certifier), resume, certifier.recorded_settings())
    wanted = {epsilon_text(epsilon) for epsilon in epsilons} if certifier.uses_epsilons else {""}
    return finished(kept, names, wanted)


def sort_certified(out, columns, names):
    """certified.csv under `out` rewritten in the order of `names` (each image's rows by ascending epsilon), the rows
    of images not among them left out (an earlier run's, on another folder); returns the rows."""
    path = out / CSV_NAME
    order = {name: i for i, name in enumerate(names)}
    rows = sorted((row for row in read_certified(path, columns) if row["image"] in order),
                  key=lambda row: (order[row["image"]], float(row["epsilon"] or 0)))
    write_certified(path, rows, columns)
    return rows


def epsilon_text(epsilon):
    return "" if epsilon == "" or epsilon is None else f"{float(epsilon):g}"


def save_counterexample(certifier, row, image_u8, label, stem, out, norm):
    """Save the counterexample as a PNG and check the file read back: wrong class and within the budget."""
    name = f"{FOLDER}/{stem}_eps{epsilon_text(row['epsilon'])}.png"
    save_image(row["counterexample"], out / name)
    back = np.asarray(Image.open(out / name).convert("RGB"))
    prediction = int(np.argmax(model_logits(certifier.model, back)[0]))
    if prediction == label or (norm and not within_budget(back, image_u8, norm, float(row["epsilon"]))):
        raise RuntimeError(f"{name}: the counterexample read back is not one (class {prediction}, label {label})")
    return name


def csv_row(row, name, label, file, columns):
    values = {"image": name, "label": label, "file": file, **row, "epsilon": epsilon_text(row["epsilon"]),
              "seconds": f"{row['seconds']:.3f}"}
    return {column: "" if values.get(column) is None else
            (f"{values[column]:.6g}" if isinstance(values[column], float) else str(values[column]))
            for column in columns}


def certify_images(certifier, images_u8, labels, epsilons, names, stems=None, out=None, done=(), norm=None):
    """Certify each image (its true class `labels[i]`, or without labels its clean prediction) at `epsilons`
    (ascending), skipping the names in `done`. With `out`, counterexamples go to out/counterexamples/ and each
    image's rows are appended to out/certified.csv as it finishes. Returns the new rows (dicts of strings)."""
    columns = csv_columns(certifier)
    stems = stems or [Path(name).stem for name in names]
    rows, done = [], set(done)
    todo = [i for i, name in enumerate(names) if name not in done]
    for i in tqdm(todo, unit="image", desc=f"certifying ({certifier.name})", disable=None):
        label = labels[i] if labels is not None else int(np.argmax(model_logits(certifier.model, images_u8[i])[0]))
        finished = []
        for row in certifier.certify(images_u8[i], label, epsilons):
            file = ""
            if row.get("counterexample") is not None and out is not None:
                file = save_counterexample(certifier, row, images_u8[i], label, stems[i], out, norm)
            finished.append(csv_row(row, names[i], label, file, columns))
        if out is not None:
            append_csv(out / CSV_NAME, finished, columns)
        rows += finished
    return rows


# ---- the report -----------------------------------------------------------------------------------------------

def accuracy_table(rows, epsilons):
    """Per epsilon: counts of each verdict, the certified accuracy (robust / images) and its upper end (robust +
    unknown: what no counterexample has refuted)."""
    table = []
    for epsilon in epsilons:
        at = [row for row in rows if row["epsilon"] == epsilon_text(epsilon)]
        count = {verdict: sum(row["verdict"] == verdict for row in at)
                 for verdict in (ROBUST, NOT_ROBUST, UNKNOWN, MISCLASSIFIED)}
        images = len(at)
        table.append(dict(epsilon=epsilon, images=images, **count,
                          certified=count[ROBUST] / images if images else 0.0,
                          at_most=(count[ROBUST] + count[UNKNOWN]) / images if images else 0.0,
                          seconds=sum(float(row["seconds"]) for row in at) / images if images else 0.0))
    return table


def summary_markdown(table, method, norm, model_name, folder, lattice, unit):
    lines = [f"# Certified accuracy: {method}, {norm}", "",
             f"Model {model_name}, images of {folder}, "
             f"{'the 8-bit lattice (whole levels)' if lattice else 'the real-valued ball'}; epsilon in {unit}.", "",
             "| epsilon | images | robust | not robust | unknown | misclassified | certified accuracy | "
             "at most | seconds per image |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in table:
        lines.append(f"| {row['epsilon']:g} | {row['images']} | {row['robust']} | {row['not robust']} | "
                     f"{row['unknown']} | {row['misclassified']} | {row['certified']:.1%} | {row['at_most']:.1%} | "
                     f"{row['seconds']:.2f} |")
    lines += ["", "Certified accuracy: the share of images proved robust (correct and no image within the budget "
              "changes the class). At most: robust plus unknown, the share that no counterexample refutes; the true "
              "robust accuracy lies between the two."]
    return "\n".join(lines) + "\n"


def accuracy_figure(table, method, norm, unit):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    epsilons = [row["epsilon"] for row in table]
    axis.plot(epsilons, [row["certified"] for row in table], marker="o", label="certified (proved robust)")
    axis.plot(epsilons, [row["at_most"] for row in table], marker="s", linestyle="--",
              label="at most (robust + unknown)")
    axis.set_xlabel(f"epsilon ({unit})")
    axis.set_ylabel("accuracy")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(f"Certified accuracy, {method}, {norm}")
    axis.grid(alpha=0.3)
    axis.legend()
    return figure


def write_certify_report(rows, out, epsilons, method, norm, model_name, folder, lattice=True):
    """summary.md and certified_accuracy.png from the rows of certified.csv; returns the table."""
    unit = "levels out of 255" if norm == "Linf" else "[0, 1] pixel units"
    table = accuracy_table(rows, epsilons)
    save_text(summary_markdown(table, method, norm, model_name, folder, lattice, unit), out / "summary.md")
    import matplotlib.pyplot as plt
    figure = accuracy_figure(table, method, norm, unit)
    save_figure(figure, out / "certified_accuracy.png")
    plt.close(figure)
    return table
