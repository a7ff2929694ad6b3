"""The report of an evaluation, made from its rows: the success, robust-accuracy and defense tables, the verdicts of
the sanity checks (utils/evaluation/checks.py), summary.md, robust_accuracy.csv and the figures (drawn by
utils.figures).

Public surface: write_report (every file, from the rows of this plan) and robust_accuracy (the rows of
robust_accuracy.csv: per epsilon, accuracy after the ensemble's attacks 1..k, then the worst case). With step 8's
--certify, the certifiers' rows (utils/evaluation/interval.py) add the lower bound: a certified_accuracy column, the
interval table, a sixth sanity check and robust_interval.png.
"""
import csv
import platform
from dataclasses import dataclass

import torch
import torchvision

from utils.attacks import ATTACKS, budget_unit
from utils.certify import CERTIFIERS, NOT_ROBUST
from utils.evaluation.checks import SANITY_CHECKS, check_proved_not_fooled, percent
from utils.evaluation.interval import certified_counts
from utils.figures import grouped_bars_figure, plt
from utils.files import atomic_path, save_figure, save_text
from utils.evaluation.plan import STANDARD_ENSEMBLE, CLEAN, Job, defense_method, job_of, stage_steps, top_steps
from utils.models import get_label
from utils.threat import NAMES, UNITS, describe

ACCURACY_COLUMNS = ("norm", "epsilon", "attack", "images", "clean_accuracy", "robust_accuracy")
CERTIFIED_COLUMN = "certified_accuracy"


def group_mean(rows, value):
    """The mean of value(row) over the photos, per job."""
    groups = {}
    for row in rows:
        groups.setdefault(job_of(row), []).append(value(row))
    return {job: sum(values) / len(values) for job, values in groups.items()}


def proved_share(certified, epsilon, images):
    """The share of the photos that some certifier proved robust at `epsilon` (a proof from any one is a proof)."""
    return max(certified_counts(rows, epsilon)[0] for rows in certified.values()) / images


def robust_counts(rows, plan, epsilons):
    """(photos, photos correct when clean, [(epsilon, attack, photos still robust)]): per epsilon, the count after the
    ensemble's attacks 1..k, then "worst-case" after all of them; robust_accuracy.csv's numbers and the library
    call's (utils/evaluation/robust.py), counted once."""
    correct = {row["image"]: row["clean_correct"] == "1" for row in rows if job_of(row) == CLEAN}
    fooled = {(job_of(row), row["image"]) for row in rows if row["attack"] == "ensemble" and row["success"] == "1"}
    table = []
    for epsilon in epsilons:
        robust = {name for name, ok in correct.items() if ok}
        for stage in plan.stages_at(epsilon):
            robust = {name for name in robust if (stage, name) not in fooled}
            table.append((epsilon, stage.method, len(robust)))
        table.append((epsilon, "worst-case", len(robust)))
    return len(correct), sum(correct.values()), table


def robust_accuracy(rows, plan, settings, certified=None):
    """robust_accuracy.csv's rows: per epsilon, the accuracy after the ensemble's attacks 1..k (cumulative, as
    AutoAttack prints it), then the worst case over all of them. A photo misclassified when clean is not robust.
    With `certified` ({certifier: its rows}), every row also gives the certified accuracy at its epsilon."""
    images, correct, table = robust_counts(rows, plan, settings.epsilons)
    clean = correct / images
    found = [dict(zip(ACCURACY_COLUMNS, (settings.norm, f"{epsilon:g}", attack, images, f"{clean:.6g}",
                                         f"{robust / images:.6g}")))
             for epsilon, attack, robust in table]
    if certified:
        for row in found:
            row[CERTIFIED_COLUMN] = f"{proved_share(certified, float(row['epsilon']), images):.6g}"
    return found


def smallest_distances(rows):
    """Per clean-correct photo, the smallest adversarial perturbation the ensemble found, in the norm's units: FAB's
    distance (its report, which may exceed every epsilon) or the size of a PNG that fooled the model (judged on the
    file read back), the smaller; inf where none was found. Each is an upper bound on the photo's true minimal
    distance, so robust accuracy read from them is an upper bound too, as any attack's."""
    correct = {row["image"] for row in rows if row["attack"] == "clean" and row["clean_correct"] == "1"}
    smallest = dict.fromkeys(correct, float("inf"))
    for row in rows:
        if row["attack"] != "ensemble" or row["image"] not in correct:
            continue
        found = [float(row["distance"])] if row["distance"] not in ("", "inf") else []
        found += [float(row["size"])] if row["success"] == "1" else []
        smallest[row["image"]] = min([smallest[row["image"]], *found])
    return smallest


def distance_figure(rows, accuracy, settings):
    """Robust accuracy against epsilon read from the smallest adversarial distances (`smallest_distances`): the share
    of all photos whose smallest distance found exceeds epsilon, a step curve from 0 to past the largest one, with
    step 8's worst case at each evaluated epsilon as dots (the two agree there: FAB's distance within epsilon means a
    PNG that fooled the model)."""
    images = int(accuracy[0]["images"])
    distances = sorted(smallest_distances(rows).values())
    finite = [d for d in distances if d != float("inf")]
    right = 1.1 * max([*finite, *settings.epsilons])
    grid = sorted({0.0, right, *finite})
    share = [100 * sum(d > e for d in distances) / images for e in grid]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    axis.step(grid, share, where="post", color="C0", linewidth=2, label="from the smallest adversarial distances found")
    worst = [(float(row["epsilon"]), 100 * float(row["robust_accuracy"])) for row in accuracy
             if row["attack"] == "worst-case"]
    axis.plot(*zip(*worst), "o", color="C3", markersize=7, label="step 8's worst case at each epsilon")
    axis.set(xlabel=f"epsilon ({UNITS[settings.norm]}, {NAMES[settings.norm]})", ylabel="robust accuracy (%)",
             ylim=(-3, 103), title="robust accuracy against the budget, from FAB's distances")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def accuracy_table(accuracy, plan, settings):
    cell = {(row["epsilon"], row["attack"]): float(row["robust_accuracy"]) for row in accuracy}
    clean = float(accuracy[0]["clean_accuracy"])
    header = ("epsilon", "clean accuracy", *(f"robust accuracy after {m}" for m in plan.ensemble), "worst case")
    table = [(f"{epsilon:g}", percent(clean), *(percent(cell[f"{epsilon:g}", m]) for m in plan.ensemble),
              percent(cell[f"{epsilon:g}", "worst-case"])) for epsilon in settings.epsilons]
    steps = ", ".join(f"{m} {stage_steps(m, settings)} {budget_unit(m)}"
                      for m in plan.ensemble)
    norm = "" if settings.norm == "Linf" else f"; {settings.norm}, epsilon in [0, 1] pixel units"
    return (f"## Robust accuracy ({accuracy[0]['images']} labelled photos; ensemble {steps}{norm})\n\n"
            + markdown_table(header, table) + "\n\n"
            "The attacks run in this order, each only on the photos every earlier one failed to fool (AutoAttack's "
            "flow); the accuracy after an attack is cumulative (after attacks 1..k, as AutoAttack prints it), so the "
            "last column is the per-image worst case. A photo misclassified when clean counts as not robust."
            + standard_note(plan, settings) + "\n")


def standard_note(plan, settings):
    """What AutoAttack's standard version would add in this norm that the library has no version of, and the L1
    settings: said where the default ensemble differs from the reference's."""
    missing = [m for m in STANDARD_ENSEMBLE if m not in plan.ensemble and settings.norm not in ATTACKS[m].norms]
    note = f" AutoAttack's standard {', '.join(missing)} is left out: no {settings.norm} version here." if missing else ""
    if settings.norm == "L1":
        note += (f" In L1: apgd with {settings.restarts or 5} restarts, apgd-t towards {settings.target_classes or 5} "
                 "classes (AutoAttack's standard version: 5 and 5).")
    return note


def interval_table(accuracy, certified, settings):
    """Per epsilon: certified <= true <= attacked, each certifier's numbers, and the gap in images."""
    images = int(accuracy[0]["images"])
    attacked = {row["epsilon"]: round(float(row["robust_accuracy"]) * images) for row in accuracy
                if row["attack"] == "worst-case"}
    header = ["epsilon", "attacked (worst case)"]
    for name in certified:
        header += [f"{name}: proved robust"] + ([f"{name}: not refuted"] if refutes(name) else [])
    header += ["true robust accuracy", "gap (images neither proved nor fooled)"]
    table = []
    for epsilon in settings.epsilons:
        cells, low, high = [f"{epsilon:g}", share(attacked[f"{epsilon:g}"], images)], 0, attacked[f"{epsilon:g}"]
        for name, rows in certified.items():
            robust, not_refuted = certified_counts(rows, epsilon)
            cells.append(share(robust, images))
            if refutes(name):
                cells.append(share(not_refuted, images))
                high = min(high, not_refuted)
            low = max(low, robust)
        cells += [f"in [{percent(low / images)}, {percent(high / images)}]", str(attacked[f"{epsilon:g}"] - low)]
        table.append(cells)
    names = ", ".join(f"{name} ({CERTIFIERS[name].description})" for name in certified)
    return (f"## Robust accuracy as an interval (certified by {names})\n\n" + markdown_table(header, table) + "\n\n"
            "Certified <= true <= attacked: a photo proved robust cannot be fooled by any attack within the budget, "
            "and one the attacks fooled is not robust, so the true robust accuracy lies between the share proved and "
            "the share the attacks left standing (and, for the exact verifier, no higher than the share it did not "
            "refute: proved robust or unknown at its time limit). The gap counts the photos neither proved robust "
            "nor fooled: zero means the attacks found the exact answer.\n")


def refutes(name):
    """Whether a certifier also finds counterexamples (an exact one), so that what it leaves unrefuted bounds the
    true robust accuracy from above too."""
    return NOT_ROBUST in CERTIFIERS[name].verdicts


def share(count, images):
    return f"{percent(count / images)} ({count})"


def defense_table(rate, kept, plan, settings):
    method, steps = defense_method(plan.methods), max(settings.steps)
    rows = []
    for defense in settings.defenses:
        for epsilon in settings.epsilons:
            plain = Job(method, epsilon, steps, defense)
            adaptive = Job(method, epsilon, steps, defense, "adaptive")
            rows.append((defense, f"{epsilon:g}", percent(kept[plain]), percent(rate[plain]),
                         percent(rate[adaptive]) if settings.adaptive else "not run (--adaptive)"))
    header = ("defense", "epsilon", "clean accuracy kept", f"plain {method} success", f"adaptive {method} success")
    return (f"## Defenses ({method}, {steps} steps; judged on the PNG read back, through the real defense)\n\n"
            + markdown_table(header, rows) + "\n")


def run_facts(photos, settings, context):
    """What a rerun needs to give the same bytes."""
    return (f"Run: batch size {settings.batch_size}, {torch.get_num_threads()} torch thread(s) per process, "
            f"{context.world_size} process{'es' if context.world_size > 1 else ''}, {settings.workers} loader workers, "
            f"seed {settings.seed}, device {context.device}, memory format {settings.memory_format}, "
            f"precision {settings.precision}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}. "
            "The same inputs, seed, batch size, threads per process, memory format, precision and device give the same "
            "bytes whatever the number of processes; another batch size, thread count, memory format or precision "
            "changes floats, so verdicts may differ for images at the decision boundary.")


def epsilon_sentence(norm):
    """How the report's epsilons read: levels out of 255 in L-infinity (the sentence of every earlier report), the
    norm of the whole perturbation in [0, 1] units in L2 and L1."""
    if norm == "Linf":
        return "Epsilon in levels out of 255 (L-infinity)."
    return (f"Threat model {norm}: epsilon is the {norm} norm of the whole perturbation in [0, 1] pixel units "
            "(AutoAttack's and RobustBench's convention), measured on the PNG read back.")


@dataclass
class Report:
    """What summary.md is written from: the plan's `rows` (results.csv's, this plan's photos and jobs), their success
    `rate` and the share each defense `kept` ({job: mean}), robust_accuracy.csv's rows (`accuracy`, empty without an
    ensemble), the `photos`, the `plan`, the `skipped` files (name, reason), the run's `settings` and process
    `context`, and with --certify `certified` ({certifier: its rows})."""
    rows: list
    rate: dict
    kept: dict
    accuracy: list
    photos: object
    plan: object
    skipped: list
    settings: object
    context: object
    certified: dict = None


def summary_markdown(report):
    """summary.md's text for a Report."""
    rows, rate, kept, accuracy, certified = report.rows, report.rate, report.kept, report.accuracy, report.certified
    photos, plan, skipped, settings = report.photos, report.plan, report.skipped, report.settings
    goal = f"targeted ({get_label(plan.target, plan.classes)})" if plan.target is not None else "untargeted"
    labels = (f"Labels: {photos.label_source}." if photos.labels else
              "No labels were given: the clean predictions stood in for them (untargeted success means leaving the "
              "clean prediction), so no accuracy is reported.")
    readable = len(photos.names) - len(skipped)
    grid = f"Goal of the --methods grid: {goal}. " if plan.methods else ""
    lines = [f"# Evaluation of {settings.model} on {readable} photos from {settings.folder}", "",
             f"{grid}Success is judged on each saved PNG read back from disk. "
             f"{epsilon_sentence(settings.norm)} {labels}", "", run_facts(photos, settings, report.context), ""]
    if skipped:
        lines += [f"{len(skipped)} unreadable files, left out of every rate:", ""]
        lines += [f"- skipped: {name} ({reason})" for name, reason in skipped] + [""]
    if accuracy:
        lines += [accuracy_table(accuracy, plan, settings)]
    if certified:
        lines += [interval_table(accuracy, certified, settings)]
    if plan.methods:
        header = ("method", "steps", *(f"eps {epsilon:g}" for epsilon in settings.epsilons))
        table = [(m, top_steps(m, settings), *(percent(rate[Job(m, e, top_steps(m, settings))]) for e in settings.epsilons))
                 for m in plan.methods]
        lines += [f"## Success rate per method and epsilon (at the largest steps, {max(settings.steps)})", "",
                  markdown_table(header, table), ""]
    checks = [check(rows, rate, plan, settings) for check in SANITY_CHECKS]
    if certified:
        checks.append(check_proved_not_fooled(rows, certified, plan, settings))
    verdicts = {True: "PASS", False: "FAIL", None: "N/A"}
    lines += ["## Sanity checks (Carlini et al. 2019, \"On Evaluating Adversarial Robustness\")", ""]
    lines += [f"{number}. **{verdicts[ok]}** {text}" for number, (ok, text) in enumerate(checks, 1)]
    if settings.defenses:
        lines += ["", defense_table(rate, kept, plan, settings)]
    return "\n".join(lines).rstrip() + "\n"


def figures(rate, kept, plan, settings, rows=(), accuracy=()):
    """{file name: figure}: success against epsilon and steps per method, through each defense, and robust accuracy
    against epsilon from FAB's distances when FAB was in the ensemble."""
    result = {}
    if accuracy and "fab" in plan.ensemble:
        result["robust_vs_distance.png"] = distance_figure(rows, accuracy, settings)
    if not plan.methods:
        return result
    methods, epsilon, steps = plan.methods, max(settings.epsilons), max(settings.steps)
    # bars, not lines: attacks that all reach 100% (or 0%) would hide each other's lines
    series = [(m, {"color": f"C{k}"}) for k, m in enumerate(methods)]  # a method's colour is the same in both
    by_epsilon = {(f"{e:g}", m): rate[Job(m, e, top_steps(m, settings))] for e in settings.epsilons for m in methods}
    all_steps = [*settings.steps, 2 * steps]
    by_steps = {(str(s), m): rate[Job(m, epsilon, s)] if ATTACKS[m].iterative or s == 1 else None
                for s in all_steps for m in methods}
    result.update({"success_vs_epsilon.png": grouped_bars_figure(
                  [("", by_epsilon)], [f"{e:g}" for e in settings.epsilons], series, "attack success rate (%)",
                  f"success per epsilon ({UNITS[settings.norm] if settings.norm == 'Linf' else describe(settings.norm)})"
                  f", at the largest steps ({steps}; fgsm: 1)"),
              "success_vs_steps.png": grouped_bars_figure(
                  [("", by_steps)], [str(s) for s in all_steps], series, "attack success rate (%)",
                  f"success per number of steps, at epsilon {epsilon:g} (fgsm: one step only)")})
    if settings.defenses:
        method = defense_method(methods)
        attacks = ("plain", "adaptive") if settings.adaptive else ("plain",)
        series = [("clean accuracy kept", {"color": "0.6"})] + \
            [(f"{attack} {method} success", {"color": "C0" if attack == "plain" else "C3"}) for attack in attacks]
        panels = []
        for epsilon in settings.epsilons:
            values = {}
            for defense in settings.defenses:
                values[defense, series[0][0]] = kept[Job(method, epsilon, steps, defense)]
                for attack, (name, _) in zip(attacks, series[1:]):
                    values[defense, name] = rate[Job(method, epsilon, steps, defense, attack)]
            panels.append((f"epsilon {epsilon:g}", values))
        result["defenses.png"] = grouped_bars_figure(
            panels, list(settings.defenses), series, "% of photos",
            f"{method}, {steps} steps: judged on the PNG read back, through the real defense")
    return result


def interval_figure(accuracy, certified, settings):
    """Robust accuracy against epsilon as a band: the attacks' worst case above, the share proved robust below."""
    images = int(accuracy[0]["images"])
    epsilons = list(settings.epsilons)
    attacked = [100 * float(row["robust_accuracy"]) for row in accuracy if row["attack"] == "worst-case"]
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    # wide and pale, so that a bound drawn on top of it where they meet (often: the exact verifier's) stays visible
    axis.plot(epsilons, attacked, color="tab:red", marker="o", markersize=9, linewidth=5, alpha=0.45,
              label="attacked: the ensemble's worst case")
    styles = ({"color": "tab:blue", "marker": "s", "linestyle": "-"},
              {"color": "tab:green", "marker": "^", "linestyle": "--"})
    lowest, highest = [0.0] * len(epsilons), list(attacked)
    for (name, rows), style in zip(certified.items(), styles * len(certified)):
        counts = [certified_counts(rows, epsilon) for epsilon in epsilons]
        proved = [100 * robust / images for robust, _ in counts]
        lowest = [max(a, b) for a, b in zip(lowest, proved)]
        axis.plot(epsilons, proved, linewidth=2, label=f"proved robust: {name}", **style)
        if refutes(name):
            not_refuted = [100 * count / images for _, count in counts]
            highest = [min(a, b) for a, b in zip(highest, not_refuted)]
            axis.plot(epsilons, not_refuted, color=style["color"], marker="v", markersize=9, markerfacecolor="none",
                      linestyle=":", linewidth=2, zorder=3, label=f"not refuted: {name} (robust or unknown)")
    axis.fill_between(epsilons, lowest, highest, color="0.85", label="where the true robust accuracy lies")
    axis.set_xlabel(f"epsilon ({UNITS[settings.norm]}, {NAMES[settings.norm]})")
    axis.set_ylabel("robust accuracy (%)")
    axis.set_ylim(0, 102)
    axis.set_xticks(epsilons)
    axis.grid(alpha=0.3)
    axis.set_title(f"Robust accuracy as an interval ({images} photos)", fontsize=10)
    axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    return figure


def write_report(rows, photos, plan, skipped, out, settings, context, certified=None):
    """summary.md, robust_accuracy.csv (with the ensemble) and the figures, from this plan's rows (and with
    `certified`, {certifier: its rows}, the interval)."""
    jobs, names = set(plan.jobs), set(photos.names)
    rows = [row for row in rows if job_of(row) in jobs and row["image"] in names]
    rate = group_mean(rows, lambda row: int(row["success"]))
    kept = group_mean(rows, lambda row: int(row["clean_defended_label"] == row["clean_label"]))
    accuracy = robust_accuracy(rows, plan, settings, certified) if plan.ensemble else []
    if accuracy:
        columns = ACCURACY_COLUMNS + ((CERTIFIED_COLUMN,) if certified else ())
        with atomic_path(out / "robust_accuracy.csv") as temp, open(temp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(accuracy)
    report = Report(rows, rate, kept, accuracy, photos, plan, skipped, settings, context, certified)
    summary = save_text(summary_markdown(report), out / "summary.md")
    drawn = figures(rate, kept, plan, settings, rows, accuracy)
    if certified and accuracy:
        drawn["robust_interval.png"] = interval_figure(accuracy, certified, settings)
    for name, figure in drawn.items():
        save_figure(figure, out / name)
        plt.close(figure)
    return summary, len(rows)
