"""Compare the robust accuracy of several models that step 8 evaluated on the same images: one table (clean accuracy,
robust accuracy after each attack of the ensemble, worst case, per model and epsilon) and one figure (worst-case
robust accuracy against epsilon, a line per model, clean accuracy at epsilon 0).

    python -m tools.compare_models EVAL_DIR [EVAL_DIR ...] --names standard,adversarial [--output-dir DIR]

Each EVAL_DIR is a step 8 output folder holding robust_accuracy.csv. Writes DIR/comparison.md and
DIR/robust_vs_epsilon.png.
"""
import csv
from pathlib import Path

from utils.cli import ArgumentParser, UsageError, comma_list, run
from utils.figures import plt
from utils.files import display_path, save_figure, save_text
from utils.evaluation.report import ACCURACY_COLUMNS, markdown_table, percent

WORST = "worst-case"


def read_accuracy(folder):
    """{(epsilon, attack): robust accuracy}, the clean accuracy, the image count and the attacks in order, from
    FOLDER/robust_accuracy.csv."""
    path = Path(folder) / "robust_accuracy.csv"
    if not path.is_file():
        raise UsageError(f"{path}: no such file (run step 8 with labels and its ensemble on that folder first)")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if set(ACCURACY_COLUMNS) - set(reader.fieldnames or ()):
            raise UsageError(f"{path}: not step 8's robust_accuracy.csv (columns {', '.join(ACCURACY_COLUMNS)})")
        rows = list(reader)
    if not rows:
        raise UsageError(f"{path}: holds no rows")
    cells = {(float(row["epsilon"]), row["attack"]): float(row["robust_accuracy"]) for row in rows}
    attacks = list(dict.fromkeys(row["attack"] for row in rows if row["attack"] != WORST))
    return {"cells": cells, "clean": float(rows[0]["clean_accuracy"]), "images": int(rows[0]["images"]),
            "attacks": attacks, "epsilons": sorted({epsilon for epsilon, _ in cells}), "norm": rows[0]["norm"]}


def caption(norm):
    """How the epsilons of `norm` read, in a caption or on an axis."""
    if norm == "Linf":
        return "epsilon in levels out of 255, L-infinity"
    return f"epsilon the {norm} norm of the whole perturbation in [0, 1] pixel units"


def comparison_markdown(results, names):
    attacks = results[0]["attacks"]
    header = ("model", "epsilon", "clean accuracy", *(f"after {attack}" for attack in attacks), "worst case")
    rows = [(name, f"{epsilon:g}", percent(result["clean"]),
             *(percent(result["cells"][epsilon, attack]) for attack in attacks), percent(result["cells"][epsilon, WORST]))
            for name, result in zip(names, results) for epsilon in result["epsilons"]]
    return (f"Robust accuracy on {results[0]['images']} test images ({caption(results[0]['norm'])}; "
            "\"after\" an attack is cumulative, the worst case is per image):\n\n" + markdown_table(header, rows) + "\n")


def comparison_figure(results, names):
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for k, (name, result) in enumerate(zip(names, results)):
        epsilons = [0.0] + result["epsilons"]
        accuracy = [result["clean"]] + [result["cells"][epsilon, WORST] for epsilon in result["epsilons"]]
        axis.plot(epsilons, [100 * value for value in accuracy], marker="os^D"[k % 4], linestyle="-", color=f"C{k}",
                  label=name, linewidth=2, markersize=7)
    unit = "levels out of 255" if results[0]["norm"] == "Linf" else f"{results[0]['norm']}, [0, 1] pixel units"
    axis.set(xlabel=f"epsilon ({unit}; 0: clean accuracy)", ylabel="worst-case robust accuracy (%)",
             ylim=(-3, 103), title="robust accuracy against the attack budget")
    axis.set_xticks([0.0] + results[0]["epsilons"])
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def main(args):
    if len(args.names) != len(args.folders):
        raise UsageError(f"--names gives {len(args.names)} names for {len(args.folders)} folders")
    results = [read_accuracy(folder) for folder in args.folders]
    if len({result["images"] for result in results}) > 1:
        raise UsageError("the folders were evaluated on different numbers of images: not comparable")
    if len({result["norm"] for result in results}) > 1:
        raise UsageError("the folders were evaluated in different norms (--norm): not comparable")
    out = Path(args.output_dir)
    table = save_text(comparison_markdown(results, args.names), out / "comparison.md")
    figure = comparison_figure(results, args.names)
    save_figure(figure, out / "robust_vs_epsilon.png")
    plt.close(figure)
    print(table.read_text())
    print(f"Wrote {display_path(table)} and {display_path(out / 'robust_vs_epsilon.png')}")


def get_args_parser():
    parser = ArgumentParser(description="Compare models' robust accuracy from step 8's output folders.")
    parser.add_argument("folders", nargs="+", help="step 8 output folders, each with robust_accuracy.csv")
    parser.add_argument("--names", type=comma_list(str, "--names"), required=True,
                        help="a display name per folder, comma-separated (so no comma inside a name), in the same order")
    parser.add_argument("--output-dir", default="outputs/robust-demo", help="(default: %(default)s)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
