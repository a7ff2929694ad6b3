"""Smoothing's part of step 10's report: certified accuracy against the L2 radius, as a table and a figure.

Certified accuracy at radius r (Cohen et al. 2019): the share of images whose smoothed classifier certifies the true
class (verdict `robust`) with a radius of at least r; abstentions and other classes count as not certified. Rows are
certified.csv's, as dicts, their values numbers or the strings a CSV reader gives.
"""
import numpy as np

from utils.figures import plt
from utils.files import save_figure, save_text

STYLES = ({"color": "tab:blue", "linestyle": "-"}, {"color": "tab:red", "linestyle": "--"},
          {"color": "tab:green", "linestyle": ":"}, {"color": "tab:purple", "linestyle": "-."})


def certified_radii(rows):
    """Each row's certified radius of its true class, -inf where it certifies none (abstains, or another class)."""
    return np.array([float(row["radius"]) if row["verdict"] == "robust" else -np.inf for row in rows])


def certified_accuracy_at(radii, rows):
    """The certified accuracy at each radius of `radii` (L2, [0, 1] pixel units), over `rows` (one per image)."""
    if not rows:
        raise ValueError("no rows: certified accuracy needs at least one image")
    found = certified_radii(rows)
    return [float(np.mean(found >= radius)) for radius in radii]


def certified_accuracy_table(radii, curves):
    """A markdown table: one row per curve (name -> rows), one column per radius, in percent with the image counts."""
    head = "| model | " + " | ".join(f"r = {radius:g}" for radius in radii) + " |"
    rule = "| --- |" + " ---: |" * len(radii)
    lines = [head, rule]
    for name, rows in curves.items():
        shares = certified_accuracy_at(radii, rows)
        cells = [f"{share:.0%} ({round(share * len(rows))}/{len(rows)})" for share in shares]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def certified_accuracy_figure(curves, title="Certified accuracy of the smoothed classifier", marks=(), cap=None):
    """Certified accuracy (%) against the L2 radius, one step line per curve (name -> rows), each in its own colour
    and dash so that the lines stay apart in grey too; `marks`, radii where the table's values are dotted; `cap`, the
    largest radius n samples can certify (smoothing.largest_radius), drawn as a grey line: the curves fall there
    because of n, not because of the models."""
    largest = max(max([0.0, *certified_radii(rows)[np.isfinite(certified_radii(rows))]]) for rows in curves.values())
    grid = np.linspace(0, max(largest * 1.1, 1e-3), 400)
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for (name, rows), style in zip(curves.items(), STYLES * len(curves)):
        axis.plot(grid, 100 * np.array(certified_accuracy_at(grid, rows)), label=name, linewidth=2, **style)
        if marks:
            axis.plot(marks, 100 * np.array(certified_accuracy_at(marks, rows)), "o", color=style["color"])
    if cap is not None:
        axis.axvline(cap, color="grey", linestyle=":", linewidth=1.5,
                     label=f"the largest radius n samples certify ({cap:.2f})")
    axis.set_xlabel("L2 radius ([0, 1] pixel units)")
    axis.set_ylabel("certified accuracy (%)")
    axis.set_ylim(0, 102)
    axis.set_xlim(0, grid[-1])
    axis.grid(alpha=0.3)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8, loc="lower left")  # the curves stay near the top: the space below is free
    figure.tight_layout()
    return figure


def default_radii(sigma):
    """The radii of smoothing's table when none are asked for: 0 to 2 sigma by halves of sigma (Cohen et al.'s
    certified accuracy falls off over that range at any sigma)."""
    return [round(sigma * step / 2, 6) for step in range(5)]


def verdict_counts(rows):
    return {verdict: sum(row["verdict"] == verdict for row in rows) for verdict in ("robust", "misclassified",
                                                                                     "abstain")}


def smoothing_summary(rows, radii, settings, cap, model_name, folder):
    """summary.md for --method smoothing: the certified accuracy at each radius, the verdicts and the settings."""
    count = verdict_counts(rows)
    seconds = sum(float(row["seconds"]) for row in rows) / len(rows)
    lines = ["# Certified accuracy: smoothing, L2", "",
             f"Model {model_name}, images of {folder}: the smoothed classifier at sigma {settings.sigma:g} "
             f"(n0 {settings.n0}, n {settings.n}, alpha {settings.alpha:g}, seed {settings.seed}); radius as the L2 "
             f"distance between images in [0, 1] pixel units. With n = {settings.n} samples no radius above "
             f"{cap:.3f} can be certified.", "",
             certified_accuracy_table(radii, {model_name: rows}).rstrip("\n"), "",
             "| images | robust | misclassified | abstain | seconds per image |",
             "| ---: | ---: | ---: | ---: | ---: |",
             f"| {len(rows)} | {count['robust']} | {count['misclassified']} | {count['abstain']} | {seconds:.2f} |",
             "", "Certified accuracy at radius r: the share of images whose smoothed classifier certifies the true "
             "class (or, without labels, the base model's own clean answer) with a radius of at least r; each "
             "certificate holds with probability at least 1 - alpha over the noise drawn."]
    return "\n".join(lines) + "\n"


def write_smoothing_report(rows, out, radii, settings, cap, model_name, folder):
    """summary.md and certified_accuracy.png from smoothing's rows of certified.csv; returns the certified accuracy
    at each radius."""
    save_text(smoothing_summary(rows, radii, settings, cap, model_name, folder), out / "summary.md")
    figure = certified_accuracy_figure({model_name: rows}, marks=radii, cap=cap,
                                       title=f"Certified accuracy of the smoothed {model_name}, sigma {settings.sigma:g}")
    save_figure(figure, out / "certified_accuracy.png")
    plt.close(figure)
    return certified_accuracy_at(radii, rows)
