"""Writing files atomically (a temp file beside the target, then a rename) so no half-written output is ever left."""
import glob
import os
import re
import tempfile
import csv
import json
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
from PIL import Image

from utils.cli import UsageError


# The process's umask, read once at import (os.umask can only be read by setting it, which is not thread-safe).
UMASK = os.umask(0o022)
os.umask(UMASK)


# atomic_path's temp files: hidden, named after their target, marked so that nothing else is taken for one
TEMP_MARK = ".tmp"


def temp_names(target=None):
    """The names of atomic_path's temp files (.NAME.XXXXXXXX.tmp.SUFFIX, XXXXXXXX mkstemp's) for the target file
    named `target`, or for any target."""
    name = ".+" if target is None else re.escape(target)
    suffix = r"(\.[^.]*)?" if target is None else re.escape(Path(target).suffix)
    return re.compile(r"\." + name + r"\.[a-z0-9_]{8}" + re.escape(TEMP_MARK) + suffix)


TEMP_NAME = temp_names()


def temp_beside(path):
    """A new empty temp file in `path`'s folder (made if missing) for what will become `path`: hidden, its name
    TEMP_NAME's (.NAME.XXXXXXXX.tmp.SUFFIX), the target's suffix kept last for writers that read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_MARK + path.suffix)
    os.close(handle)
    return Path(temp)


def remove_killed_writes(folder):
    """Remove from `folder` and below the temp files of atomic_path calls whose process was killed before the rename
    (a SIGKILL runs no cleanup): they are no output. Only while no other process writes into `folder`."""
    for temp in Path(folder).rglob(f".*{TEMP_MARK}*"):
        if TEMP_NAME.fullmatch(temp.name) and temp.is_file():
            temp.unlink(missing_ok=True)


def remove_killed_writes_of(paths):
    """Remove the temp files that atomic_path calls for these target files left when their process was killed
    before the rename; a temp file of any other target stays. Only while no other process writes these targets."""
    for path in map(Path, paths):
        pattern = temp_names(path.name)
        for temp in path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_MARK}*"):
            if pattern.fullmatch(temp.name) and temp.is_file():
                temp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path):
    """Yield a temp path in the target's folder (temp_beside); on success rename it onto `path`, on failure remove
    it. The file gets the permissions a plain open() would give it (mkstemp makes it private to its owner)."""
    path = Path(path)
    temp = temp_beside(path)
    try:
        yield Path(temp)
        os.chmod(temp, 0o666 & ~UMASK)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def save_image(array_u8, path, **pil_options):
    """Save an HxWx3 uint8 array; the format follows the suffix (PNG is lossless, JPEG takes quality=...)."""
    with atomic_path(path) as temp:
        Image.fromarray(np.ascontiguousarray(array_u8)).save(temp, format=Image.registered_extensions()[Path(path).suffix.lower()], **pil_options)
    return Path(path)


def save_array(array, path):
    with atomic_path(path) as temp:
        with open(temp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
    return Path(path)


def save_text(text, path):
    with atomic_path(path) as temp:
        Path(temp).write_text(text)
    return Path(path)


def save_settings(settings, path):
    """Record what made a results file (a JSON dict) beside it, for check_same_settings."""
    return save_text(json.dumps(settings, sort_keys=True) + "\n", path)


def check_same_settings(path, settings, results):
    """UsageError unless the settings recorded at `path` (save_settings) are `settings`, naming what differs: --resume
    keeps the rows of `results` only when the same model and settings made them."""
    path = Path(path)
    earlier = json.loads(path.read_text()) if path.is_file() else None
    if earlier == settings:
        return
    if not isinstance(earlier, dict):
        raise UsageError(f"{results}: no record of the settings it was made with ({path.name}); run without `resume`",
                         "resume")
    differ = [key for key in sorted(set(earlier) | set(settings)) if earlier.get(key) != settings.get(key)]
    raise UsageError(f"{results}: made with {', '.join(f'{key} {earlier.get(key)}' for key in differ)}, this run asks "
                     f"{', '.join(f'{key} {settings.get(key)}' for key in differ)}; run with the same settings or "
                     "without `resume`", "resume")


def append_csv(path, rows, columns):
    """Append `rows` (dicts) to the CSV file `path`, written with its header `columns` on first use, and flushed:
    a row is on disk once this returns, and a kill can tear at most the last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, columns, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerows(rows)
        handle.flush()


def save_figure(figure, path):
    with atomic_path(path) as temp:
        figure.savefig(temp, format=Path(path).suffix.lstrip(".").lower(), dpi=100, bbox_inches="tight")
    return Path(path)


def display_path(path):
    """A path as a reader should see it: relative to the working directory, else under ~, else as given. Output that
    is quoted (the README) then names no folder of the machine it ran on."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        with suppress(ValueError):
            return prefix + str(path.relative_to(base))
    return str(path)
