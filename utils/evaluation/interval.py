"""Robust accuracy as an interval: step 10's certifiers run on the photos and epsilons an evaluation attacked, so that
its report can set the share proved robust (the lower bound) beside the share the attacks left standing (the upper
bound), and flag any photo that is both proved robust and fooled (one of the two is wrong).

Each certifier's rows go to OUTPUT/certified/NAME/certified.csv (step 10's columns, counterexamples beside it as
PNGs, each read back and checked), appended per photo, so --resume keeps the photos it finished.
"""
from argparse import ArgumentParser

from utils.certify import CERTIFIERS, ROBUST, UNKNOWN
from utils.certify.run import certify_images, csv_columns, epsilon_text, finished_earlier, read_certified
from utils.cli import UsageError
from utils.models import prepare_image

FOLDER = "certified"


def interval_certifiers():
    """The certifiers that can bound step 8's robust accuracy: those that certify a budget (an epsilon)."""
    return [name for name, kind in CERTIFIERS.items() if kind.uses_epsilons]


def make_certifiers(names, model, options, image_shape=None):
    """{name: certifier} for --certify, each made with the mapping `options` (Certifier.from_options: each
    certifier's own flags' values by destination name, norm and seed among them); a model a certifier cannot read is
    refused here, before anything is written. `image_shape` (3, H, W): the size of the images to come, for a model
    that takes images as they are (None: the model's own size)."""
    return {name: CERTIFIERS[name](model, CERTIFIERS[name].from_options(**options), str(model.mean.device), image_shape)
            for name in names}


def default_certifier_options(norm, seed):
    """The options step 8's --certify gives the certifiers when none of their flags is on the command line (each
    certifier's own defaults, from its add_arguments), for `norm` and `seed`, as a dict: what the library call
    certifies with."""
    parser = ArgumentParser(add_help=False)
    for name in interval_certifiers():
        CERTIFIERS[name].add_arguments(parser)
    return {**vars(parser.parse_args([])), "norm": norm, "seed": seed}


def check_certify(names, labelled, ensemble, norm):
    if names and not (labelled and ensemble):
        raise UsageError("`certify` bounds the ensemble's robust accuracy from below: it needs true labels (an "
                         "ImageFolder tree or `labels`) and an ensemble", "certify", "labels")
    for name in names:
        check_certifies(name, norm)


def check_certifies(name, norm):
    """UsageError unless the certifier `name` certifies budgets in `norm` (step 8's --certify and the library call)."""
    if norm not in CERTIFIERS[name].norms:
        raise UsageError(f"`certify` {name} certifies {', '.join(CERTIFIERS[name].norms)}, not `norm` {norm}",
                         "certify", "norm")


def certify_photos(certifiers, model, photos, skipped, epsilons, norm, out, resume):
    """{name: the rows of its certified.csv} for the readable photos at `epsilons`, certified against their labels."""
    unreadable = {name for name, _ in skipped}
    indices = [i for i, name in enumerate(photos.names) if name not in unreadable]
    names = [photos.names[i] for i in indices]
    wanted = {epsilon_text(epsilon) for epsilon in epsilons}
    found, images = {}, {}  # each photo decoded once, for the first certifier that needs it
    for name, certifier in certifiers.items():
        folder = out / FOLDER / name
        done = finished_earlier(certifier, folder, names, epsilons, resume)
        todo = [i for i, image in zip(indices, names) if image not in done]
        images.update((i, prepare_image(photos.paths[i], model)) for i in todo if i not in images)
        certify_images(certifier, [images.get(i) for i in indices], [photos.labels[i] for i in indices],
                       sorted(epsilons), names, [photos.stems[i] for i in indices], folder, done, norm)
        found[name] = [row for row in read_certified(folder / "certified.csv", csv_columns(certifier))
                       if row["image"] in set(names) and row["epsilon"] in wanted]
    return found


def certified_counts(rows, epsilon):
    """(proved robust, not refuted: robust or unknown) among the rows at `epsilon`."""
    at = [row for row in rows if row["epsilon"] == epsilon_text(epsilon)]
    robust = sum(row["verdict"] == ROBUST for row in at)
    return robust, robust + sum(row["verdict"] == UNKNOWN for row in at)


def proved_robust(rows, epsilon):
    return {row["image"] for row in rows if row["epsilon"] == epsilon_text(epsilon) and row["verdict"] == ROBUST}
