"""A model's class names: ImageNet's (the tutorial's label map), a class-list file, and the one sidecar path.

Where the names come from: `--classes FILE` (one per line), else the sidecar `NAME.classes.txt` beside a model file
NAME.pt2 / NAME.pt (`classes_path`), else ImageNet's 1000 names when the model has 1000 outputs, else "0".."C-1".
Zoo models bring their own (ImageNet's, CIFAR-10's). `find_class` turns what a user types (an index, a name, a
synonym) into an index among them.
"""
import difflib
import functools
import json
import re
from pathlib import Path

from utils.cli import UsageError

IMAGENET_LABELS = Path(__file__).resolve().parent.parent.parent / "assets" / "imagenet_idx_to_label.json"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@functools.lru_cache(maxsize=None)
def imagenet_classes():
    """ImageNet-1k's 1000 names, in index order: the tutorial's label map."""
    with open(IMAGENET_LABELS) as handle:
        labels = json.load(handle)
    return tuple(labels[str(index)] for index in range(len(labels)))


def default_classes(count):
    """Names for a model that brings none: ImageNet's for 1000 outputs, else the indices "0".."C-1"."""
    return imagenet_classes() if count == 1000 else tuple(str(index) for index in range(count))


def read_classes(path):
    """The class names in a text file, one per line (blank lines at the end ignored); bad files raise UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such class list (one class name per line)")
    try:
        lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    except (UnicodeDecodeError, OSError) as error:
        raise UsageError(f"{path}: cannot read the class list as UTF-8 text ({error})")
    names = tuple(line.strip() for line in lines)
    if not any(names) or not all(names):
        raise UsageError(f"{path}: the class list has an empty line {names.index('') + 1}; one name per line")
    return names



def classes_path(model_path):
    """NAME.pt2 (or NAME.pt) -> NAME.classes.txt: the sidecar file that names a model file's outputs, one per line."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".classes.txt")


def sidecar_classes(model_path):
    """The class list beside a model file (`classes_path`), or None when there is none."""
    sidecar = classes_path(model_path)
    return sidecar if sidecar.is_file() else None


def model_classes(count, classes_file=None, model_path=None):
    """The names of a model's `count` classes: from --classes, else the model file's sidecar, else the default."""
    source = classes_file or (sidecar_classes(model_path) if model_path else None)
    if source is None:
        return default_classes(count)
    names = read_classes(source)
    if len(names) != count:
        raise UsageError(f"{source}: {len(names)} class names for a model with {count} outputs; "
                         f"the list needs one name per line, {count} lines")
    return names



@functools.lru_cache(maxsize=None)
def get_idx_to_label():
    """The tutorial's label map: {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", ...}."""
    return dict(enumerate(imagenet_classes()))


DEFAULT_TARGET = "1"  # ImageNet's goldfish, the tutorial's target: what an attack aims at unless told


def find_class(text, classes=None):
    """A class index from an index ("1") or a name ("goldfish", "Carassius auratus") among `classes` (the model's
    names; default ImageNet's); any comma-separated synonym of a name matches, case-insensitively. Unknown or
    ambiguous names raise UsageError with suggestions."""
    labels = dict(enumerate(classes if classes is not None else imagenet_classes()))
    text = str(text).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        index = int(text)
        if index not in labels:
            raise UsageError(f"class index {index} is out of range: the model's classes are 0..{len(labels) - 1}")
        return index
    wanted = text.casefold()
    synonyms = {index: [part.strip().casefold() for part in label.split(",")] for index, label in labels.items()}
    matches = [index for index, names in synonyms.items() if wanted == labels[index].casefold() or wanted in names]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = "; ".join(f"{index} ({labels[index]})" for index in matches)
        raise UsageError(f"class name {text!r} is ambiguous: it names {listed}; pass the index instead")
    every_name = {name: index for index, names in synonyms.items() for name in names}
    close = difflib.get_close_matches(wanted, list(every_name), n=5, cutoff=0.6)
    hint = "; closest: " + ", ".join(f"{every_name[name]} ({labels[every_name[name]]})" for name in close) if close else ""
    raise UsageError(f"unknown class name {text!r}{hint}")


def get_label(index, classes=None):
    """The name of class `index` among `classes` (the model's; default ImageNet's)."""
    return (classes if classes is not None else imagenet_classes())[int(index)]

