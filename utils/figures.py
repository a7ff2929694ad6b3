"""Figures: images side by side with the model's predictions (one per tutorial step), and the evaluation's rates as
grouped bars."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def magnified_difference(adversarial_u8, original_u8):
    """The perturbation scaled so its largest level fills the grey range; returns (image, magnification)."""
    difference = adversarial_u8.astype(np.float64) - original_u8.astype(np.float64)
    largest = max(np.abs(difference).max(), 1.0)
    return np.clip(0.5 + difference / (2 * largest), 0, 1), 127.5 / largest


def image_grid(panels, columns=None, panel_size=3.2):
    """A figure of (image, title) panels in rows of `columns`; images are 8-bit or float in [0, 1]. A Figure object,
    not pyplot's: pyplot keeps every figure in one global registry until closed, which the page's concurrent requests
    would share and grow; a Figure saves itself and goes when dropped."""
    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(panel_size * columns, panel_size * rows + 0.4))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (image, title) in zip(axes.flat, panels):
        axis.imshow(image, interpolation="nearest")
        axis.set_title(title, fontsize=9, wrap=True)
    figure.tight_layout()
    return figure


def short(label, width=28):
    label = label.split(",")[0]
    return label if len(label) <= width else label[: width - 1] + "…"


def comparison_figure(original_u8, adversarial_u8, old_label, new_label):
    """Original | adversarial | the perturbation magnified, each labelled with the model's prediction."""
    difference, magnification = magnified_difference(adversarial_u8, original_u8)
    linf = int(np.abs(adversarial_u8.astype(int) - original_u8.astype(int)).max())
    return image_grid([(original_u8, f"original\npredicted: {short(old_label)}"),
                       (adversarial_u8, f"adversarial\npredicted: {short(new_label)}"),
                       (difference, f"perturbation (max {linf} levels)\nmagnified x{magnification:.0f}")])


def defense_figure(rows, defense="the defense"):
    """Per row (name, image before the defense, its prediction, image after, its prediction), the two images side by
    side: step 6's one image, step 7's plain and adaptive attacks. `defense` names it in the titles."""
    panels = []
    for name, before, before_label, after, after_label in rows:
        panels += [(before, f"{name}\npredicted: {short(before_label)}"),
                   (after, f"{name} after {defense}\npredicted: {short(after_label)}")]
    return image_grid(panels, columns=2)


# the most classes predictions_figure draws: a bar each, the figure grows with them
MOST_BARS = 20


def predictions_figure(image_u8, labels, probabilities):
    """Step 2's figure: the photo as the model sees it, and beside it its top classes (best first, at most MOST_BARS)
    as horizontal bars, each labelled with its probability."""
    labels, probabilities = list(labels)[:MOST_BARS], 100 * np.asarray(probabilities, dtype=float)[:MOST_BARS]
    figure = Figure(figsize=(7.6, max(3.4, 0.32 * len(labels) + 1.2)))
    photo, bars_axis = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.35]})
    photo.imshow(image_u8, interpolation="nearest")
    photo.axis("off")
    photo.set_title(f"{image_u8.shape[1]} x {image_u8.shape[0]}, as the model sees it\n"
                    f"predicted: {short(labels[0])}", fontsize=9)
    rows = np.arange(len(labels))
    bars = bars_axis.barh(rows, probabilities, color=["C1"] + ["C0"] * (len(labels) - 1))
    bars_axis.bar_label(bars, [f"{value:.2f}%" for value in probabilities], padding=3, fontsize=8)
    bars_axis.set_yticks(rows, [short(label) for label in labels], fontsize=9)
    bars_axis.invert_yaxis()  # the best class on top, as the lines printed
    bars_axis.set_xlim(0, 122)  # room for the largest bar's label
    bars_axis.set_xticks(range(0, 101, 25))
    bars_axis.set_xlabel("probability (%)", fontsize=9)
    bars_axis.set_title(f"top {len(labels)} classes", fontsize=9)
    bars_axis.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return figure


def grouped_bars_figure(panels, groups, series, ylabel, title):
    """One panel per entry of `panels` (title, {(group, series name): rate in [0, 1], or None for no bar}), with a bar
    per series in each group, each bar labelled with its value so a 0% bar is still seen; one legend above the panels, off the data."""
    figure, axes = plt.subplots(1, len(panels), figsize=(max(6.4, 0.3 * len(groups) * len(series) * len(panels) + 1.5), 4.2),
                                sharey=True, squeeze=False)
    width = 0.8 / len(series)
    for axis, (panel_title, values) in zip(axes[0], panels):
        for k, (name, style) in enumerate(series):
            xs = np.arange(len(groups)) + (k - (len(series) - 1) / 2) * width
            rates = [values[group, name] for group in groups]  # None: not run for that group, no bar
            bars = axis.bar(xs, [0 if rate is None else 100 * rate for rate in rates], width, label=name, **style)
            axis.bar_label(bars, ["" if rate is None else f"{100 * rate:.0f}" for rate in rates], fontsize=7, padding=1)
        axis.set_xticks(np.arange(len(groups)), groups)
        axis.set(title=panel_title, ylim=(0, 112))
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.88))
    figure.legend(handles, labels, loc="upper center", ncol=len(series), fontsize=9, bbox_to_anchor=(0.5, 0.94))
    return figure
