"""Step 6: defend the model by transforming the image it receives, e.g. re-compressing it as a lossy JPEG.

    python step_6_defend.py IMAGE [--defense jpeg|bits|median|blur|resize|random] [--quality 75] [--bits 3]
                                  [--size 3] [--sigma 1.0] [--scale 0.5] [--seed 0] [--report [--clean PHOTO]]
                                  [--model resnet18] [--output outputs/adversarial.jpg] [--no-figure]

prints "Old prediction" on the image as given and "New prediction" on the defended image read back from disk: the
JPEG file itself for jpeg, a lossless PNG for the others. With --report, also the defense's cost on a clean photo
(--clean, default IMAGE itself): does the clean prediction survive the defense? The figure defense.png, beside the
output, shows the image before and after the defense with the two predictions.
"""
from pathlib import Path

from step_2_pretrained import (add_model_arguments, defense_settings, get_device, get_label, model_from_args,
                               predict_images, prepare_image)
from utils.cli import ArgumentParser, UsageError, run
from utils.defenses import defense_parameters, describe, jpeg_bytes, make_defense
from utils.figures import defense_figure
from utils.files import atomic_path, remove_killed_writes_of, save_figure, save_image
from utils.flags import add_defense_arguments, add_device_argument, add_figure_argument

FIGURE = "defense.png"


def output_path(args):
    """The JPEG file for the jpeg defense (what the tutorial saves), a lossless PNG for the others."""
    if args.output is None:
        return Path("outputs/adversarial.jpg" if args.defense == "jpeg" else f"outputs/defended_{args.defense}.png")
    path, wanted = Path(args.output), (".jpg", ".jpeg") if args.defense == "jpeg" else (".png",)
    if path.suffix.lower() not in wanted:
        raise UsageError(f"--output for the {args.defense} defense must end in {' or '.join(wanted)}, got {path.name}")
    return path


def save_defended(image, args, path):
    """Apply the defense and write its output; the file on disk is exactly what the service would classify."""
    if args.defense == "jpeg":
        with atomic_path(path) as temp:
            temp.write_bytes(jpeg_bytes(image, **defense_parameters("jpeg", defense_settings(args))))
        return path
    return save_image(make_defense(args.defense, seed=args.seed, **defense_settings(args))(image), path)


def report_clean_cost(model, clean_path, args):
    clean = prepare_image(clean_path, model)
    defended = make_defense(args.defense, seed=args.seed, **defense_settings(args))(clean)
    before, after = predict_images(model, [clean, defended])
    verdict = "kept" if before == after else "LOST"
    print(f"Clean photo {clean_path}: {get_label(before, model.classes)} -> {get_label(after, model.classes)} after the "
          f"defense ({verdict})")


def main(args):
    name = describe(args.defense, **defense_settings(args))  # checks the defense and its parameters
    path = output_path(args)
    figure = path.parent / FIGURE
    remove_killed_writes_of([path, figure])
    model = model_from_args(args, get_device(args.device))
    image = prepare_image(args.image, model)
    saved = save_defended(image, args, path)
    defended = prepare_image(saved, model)  # the file, read back
    old, new = (get_label(predict_images(model, picture)[0], model.classes) for picture in (image, defended))
    print(f"Old prediction: {old}")
    print(f"New prediction: {new}")
    print(f"Defense: {name}, applied to the image and written to {saved}")
    if args.figure:
        print(f"Figure: {save_figure(defense_figure([('the image', image, old, defended, new)], name), figure)}")
    if args.report:
        report_clean_cost(model, args.clean or args.image, args)


def get_args_parser():
    parser = ArgumentParser(description="Defend the model by transforming its input (the tutorial's step 6).")
    parser.add_argument("image", help="the image the service receives, e.g. outputs/adversarial.png")
    add_defense_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random defense (default: %(default)s)")
    parser.add_argument("--report", action="store_true", help="also report the defense's cost on a clean photo")
    parser.add_argument("--clean", help="the clean photo for --report (default: IMAGE)")
    add_model_arguments(parser)
    add_device_argument(parser)
    parser.add_argument("--output", help="where to write the defended image (default: outputs/adversarial.jpg for jpeg, "
                                         "outputs/defended_DEFENSE.png otherwise)")
    add_figure_argument(parser, f"{FIGURE} beside --output (the image before and after the defense)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
