"""Step 9's training images: a folder read into one 8-bit tensor with its class indices, the class names, and the
seeded train/validation split; and the per-channel statistics a trained model normalizes by.

Labels: an ImageFolder tree (FOLDER/<class>/image; class names are the subfolder names, in numeric order when they
are all numbers, else sorted) or a labels CSV (columns image,label; the class names are the labels, sorted).
"""
import math
from dataclasses import dataclass

import torch

from utils.cli import UsageError
from utils.data import PhotoDataset, csv_labels, cut, list_photos, photo_batches
from utils.images import load_image
from utils.models import Preprocessing, get_image_transform


@dataclass
class Data:
    """Every image as 8-bit (N, 3, S, S), its class index, the class names, and the train/validation split."""
    images: torch.Tensor
    targets: torch.Tensor
    classes: list
    train: torch.Tensor
    val: torch.Tensor


def class_names(names):
    """ImageFolder: the subfolder names, in numeric order when they are all numbers (0, 1, ..., 10), else sorted."""
    folders = {name.split("/")[0] for name in names}
    return sorted(folders, key=lambda folder: (int(folder), folder) if folder.isdigit() else (math.inf, folder))


def read_targets(folder, labels, names):
    """(class names, class index per photo) from the ImageFolder tree or a labels CSV (labels are class names)."""
    if labels is not None:
        listed = csv_labels(labels, names, find_class=str).classes
        classes = class_names([f"{label}/" for label in listed])
        return classes, [classes.index(str(label)) for label in listed]
    if not all("/" in name for name in names):
        raise UsageError(f"{folder}: training needs labels: an ImageFolder tree (one subfolder per class) or `labels`",
                         "labels")
    classes = class_names(names)
    return classes, [classes.index(name.split("/")[0]) for name in names]


def read_images(paths, size, workers=0):
    """Every photo resized and centre-cropped to size x size, as one 8-bit tensor; an unreadable file is an error
    (a training set with holes would silently train on less)."""
    transform = get_image_transform(Preprocessing(size, (0.0,) * 3, (1.0,) * 3))
    images = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for batch in photo_batches(PhotoDataset(paths, load_image, transform), cut(len(paths), 256), workers):
        for index, image, reason in batch:
            if image is None:
                raise UsageError(f"{paths[index]}: {reason}")
            images[index] = torch.from_numpy(image).permute(2, 0, 1)
    return images


def split(count, val_fraction, seed):
    """(train indices, validation indices): a seeded permutation, its first val_fraction held out, each part sorted."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    held_out = round(count * val_fraction)
    if held_out and count - held_out < 1:
        raise UsageError(f"`val_fraction` {val_fraction} leaves no training image out of {count}", "val_fraction")
    return order[held_out:].sort().values, order[:held_out].sort().values


def load_data(folder, labels=None, image_size=32, val_fraction=0.1, seed=0, workers=0):
    """The images of `folder` (an ImageFolder tree, or any folder with a `labels` CSV) at `image_size` x
    `image_size`, their classes, and the split that holds out `val_fraction` of them (seeded by `seed`); `workers`:
    DataLoader processes decoding them. At least 2 classes."""
    paths, names = list_photos(folder)
    classes, targets = read_targets(folder, labels, names)
    if len(classes) < 2:
        raise UsageError(f"{folder}: training needs at least 2 classes, found {len(classes)}")
    train, val = split(len(paths), val_fraction, seed)
    return Data(read_images(paths, image_size, workers), torch.tensor(targets), classes, train, val)


def channel_statistics(images):
    """Per-channel mean and standard deviation of 8-bit images, in [0, 1] units: the model's normalization."""
    pixels = images.float().div(255).transpose(0, 1).flatten(1)
    return tuple(pixels.mean(dim=1).tolist()), tuple(pixels.std(dim=1).clamp_min(1e-3).tolist())
