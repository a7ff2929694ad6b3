"""The report of an evaluation, made from its rows: the success, robust-accuracy and defense tables, the five sanity
checks of Carlini et al. 2019 ("On Evaluating Adversarial Robustness"), summary.md, robust_accuracy.csv and the
figures (drawn by utils.figures).

Public surface: write_report (every file, from the rows of this plan) and robust_accuracy (the rows of
robust_accuracy.csv: per epsilon, accuracy after the ensemble's attacks 1..k, then the worst case).
"""
import csv
import platform
from itertools import pairwise

import torch
import torchvision

from step_2_pretrained import get_label
from utils.attacks import ATTACKS, budget_unit
from utils.figures import grouped_bars_figure, plt
from utils.files import atomic_path, save_figure, save_text
from utils.plan import (CLEAN, UNBOUNDED, Job, defense_method, iterative_methods, job_of, stage_steps,
                        top_steps)

ACCURACY_COLUMNS = ("epsilon", "attack", "images", "clean_accuracy", "robust_accuracy")


def group_mean(rows, value):
    """The mean of value(row) over the photos, per job."""
    groups = {}
    for row in rows:
        groups.setdefault(job_of(row), []).append(value(row))
    return {job: sum(values) / len(values) for job, values in groups.items()}


def percent(rate):
    return f"{100 * rate:.1f}%"


def check_iterative_beats_one_step(rate, plan, args):
    iterative, one_step = iterative_methods(plan.methods), [m for m in plan.methods if not ATTACKS[m].iterative]
    text = "iterative attacks at least as strong as one-step ones (per epsilon)"
    if not iterative or not one_step:
        return None, text + ": needs a one-step method (fgsm) and an iterative one in --methods"
    cell = {(method, epsilon): rate[Job(method, epsilon, top_steps(method, args))]
            for method in plan.methods for epsilon in args.epsilons}
    ok = all(cell[m, epsilon] >= cell[f, epsilon] for m in iterative for f in one_step for epsilon in args.epsilons)
    parts = [f"epsilon {epsilon:g}: " + ", ".join(f"{m} {percent(cell[m, epsilon])}" for m in plan.methods)
             for epsilon in args.epsilons]
    return ok, f"{text}: " + "; ".join(parts)


def check_monotone(rate, plan, args):
    text = "success never falls as epsilon grows (per method, epsilon " + \
        ", ".join(f"{epsilon:g}" for epsilon in args.epsilons) + ")"
    if not plan.methods:
        return None, text + ": needs the --methods grid"
    parts = [f"{method} " + " -> ".join(percent(rate[Job(method, epsilon, top_steps(method, args))])
                                        for epsilon in args.epsilons) for method in plan.methods]
    ok = all(later >= earlier for method in plan.methods for earlier, later in
             pairwise(rate[Job(method, epsilon, top_steps(method, args))] for epsilon in args.epsilons))
    return ok, f"{text}: " + "; ".join(parts)


def check_converged(rate, plan, args):
    epsilon, steps = max(args.epsilons), max(args.steps)
    text = f"doubling the steps ({steps} -> {2 * steps}, epsilon {epsilon:g}) changes success by under 1 point"
    methods = iterative_methods(plan.methods)
    if not methods:
        return None, text + ": needs an iterative method in --methods"
    changes = {m: 100 * (rate[Job(m, epsilon, 2 * steps)] - rate[Job(m, epsilon, steps)]) for m in methods}
    parts = [f"{m} {percent(rate[Job(m, epsilon, steps)])} -> {percent(rate[Job(m, epsilon, 2 * steps)])} "
             f"({changes[m]:+.1f} points)" for m in methods]
    return all(abs(change) < 1 for change in changes.values()), f"{text}: " + "; ".join(parts)


def check_unbounded(rate, plan, args):
    steps = max(args.steps)
    text = f"an unbounded budget (pgd, epsilon 255, {steps} steps) reaches 100%"
    if not plan.methods:
        return None, text + ": needs the --methods grid"
    success = rate[Job("pgd", UNBOUNDED, steps)]
    return success == 1, f"{text}: {percent(success)}"


def check_gradient_free(rows, plan, args):
    """Square runs on the photos every earlier (gradient) attack failed on: if it fools any, gradients are masked or
    a gradient attack is broken (Carlini et al. 2019)."""
    text = "the gradient-free attack fools no image that the gradient attacks failed on (same epsilon)"
    checked = [stage for epsilon in args.epsilons for k, stage in enumerate(plan.stages_at(epsilon))
               if ATTACKS[stage.method].gradient_free
               and any(not ATTACKS[earlier.method].gradient_free for earlier in plan.stages_at(epsilon)[:k])]
    if not checked:
        gradient_free = " or ".join(name for name, attack in ATTACKS.items() if attack.gradient_free)
        return None, text + f": needs {gradient_free} after a gradient attack in --ensemble"
    parts, ok = [], True
    for stage in checked:
        attacked = [row for row in rows if job_of(row) == stage]
        fooled = sum(row["success"] == "1" for row in attacked)
        ok &= fooled == 0
        parts.append(f"epsilon {stage.epsilon:g}: {stage.method} fooled {fooled} of the {len(attacked)} images "
                     "the gradient attacks failed on")
    return ok, f"{text}: " + "; ".join(parts)


def robust_accuracy(rows, plan, args):
    """robust_accuracy.csv's rows: per epsilon, the accuracy after the ensemble's attacks 1..k (cumulative, as
    AutoAttack prints it), then the worst case over all of them. A photo misclassified when clean is not robust."""
    correct = {row["image"]: row["clean_correct"] == "1" for row in rows if job_of(row) == CLEAN}
    images = len(correct)
    fooled = {(job_of(row), row["image"]) for row in rows if row["attack"] == "ensemble" and row["success"] == "1"}
    table = []
    for epsilon in args.epsilons:
        robust = {name for name, ok in correct.items() if ok}
        for stage in plan.stages_at(epsilon):
            robust = {name for name in robust if (stage, name) not in fooled}
            table.append((epsilon, stage.method, len(robust)))
        table.append((epsilon, "worst-case", len(robust)))
    clean = sum(correct.values()) / images
    return [dict(zip(ACCURACY_COLUMNS, (f"{epsilon:g}", attack, images, f"{clean:.6g}", f"{robust / images:.6g}")))
            for epsilon, attack, robust in table]


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def accuracy_table(accuracy, plan, args):
    cell = {(row["epsilon"], row["attack"]): float(row["robust_accuracy"]) for row in accuracy}
    clean = float(accuracy[0]["clean_accuracy"])
    header = ("epsilon", "clean accuracy", *(f"robust accuracy after {m}" for m in plan.ensemble), "worst case")
    table = [(f"{epsilon:g}", percent(clean), *(percent(cell[f"{epsilon:g}", m]) for m in plan.ensemble),
              percent(cell[f"{epsilon:g}", "worst-case"])) for epsilon in args.epsilons]
    steps = ", ".join(f"{m} {stage_steps(m, args)} {budget_unit(m)}"
                      for m in plan.ensemble)
    return (f"## Robust accuracy ({accuracy[0]['images']} labelled photos; ensemble {steps})\n\n"
            + markdown_table(header, table) + "\n\n"
            "The attacks run in this order, each only on the photos every earlier one failed to fool (AutoAttack's "
            "flow); the accuracy after an attack is cumulative (after attacks 1..k, as AutoAttack prints it), so the "
            "last column is the per-image worst case. A photo misclassified when clean counts as not robust.\n")


def defense_table(rate, kept, plan, args):
    method, steps = defense_method(plan.methods), max(args.steps)
    rows = []
    for defense in args.defenses:
        for epsilon in args.epsilons:
            plain = Job(method, epsilon, steps, defense)
            adaptive = Job(method, epsilon, steps, defense, "adaptive")
            rows.append((defense, f"{epsilon:g}", percent(kept[plain]), percent(rate[plain]),
                         percent(rate[adaptive]) if args.adaptive else "not run (--adaptive)"))
    header = ("defense", "epsilon", "clean accuracy kept", f"plain {method} success", f"adaptive {method} success")
    return (f"## Defenses ({method}, {steps} steps; judged on the PNG read back, through the real defense)\n\n"
            + markdown_table(header, rows) + "\n")


def run_facts(photos, args, context):
    """What a rerun needs to give the same bytes."""
    return (f"Run: batch size {args.batch_size}, {torch.get_num_threads()} torch thread(s) per process, "
            f"{context.world_size} process{'es' if context.world_size > 1 else ''}, {args.workers} loader workers, "
            f"seed {args.seed}, device {context.device}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}. The same inputs, seed, batch size and threads per process give "
            "the same bytes whatever the number of processes; another batch size or thread count changes floats, "
            "so verdicts may differ for images at the decision boundary.")


def summary_markdown(rows, rate, kept, accuracy, photos, plan, skipped, args, context):
    goal = f"targeted ({get_label(plan.target)})" if plan.target is not None else "untargeted"
    labels = (f"Labels: {photos.label_source}." if photos.labels else
              "No labels were given: the clean predictions stood in for them (untargeted success means leaving the "
              "clean prediction), so no accuracy is reported.")
    readable = len(photos.names) - len(skipped)
    grid = f"Goal of the --methods grid: {goal}. " if plan.methods else ""
    lines = [f"# Evaluation of {args.model} on {readable} photos from {args.folder}", "",
             f"{grid}Success is judged on each saved PNG read back from disk. "
             f"Epsilon in levels out of 255 (L-infinity). {labels}", "", run_facts(photos, args, context), ""]
    if skipped:
        lines += [f"{len(skipped)} unreadable files, left out of every rate:", ""]
        lines += [f"- skipped: {name} ({reason})" for name, reason in skipped] + [""]
    if accuracy:
        lines += [accuracy_table(accuracy, plan, args)]
    if plan.methods:
        header = ("method", "steps", *(f"eps {epsilon:g}" for epsilon in args.epsilons))
        table = [(m, top_steps(m, args), *(percent(rate[Job(m, e, top_steps(m, args))]) for e in args.epsilons))
                 for m in plan.methods]
        lines += [f"## Success rate per method and epsilon (at the largest steps, {max(args.steps)})", "",
                  markdown_table(header, table), ""]
    checks = [check(rate, plan, args) for check in (check_iterative_beats_one_step, check_monotone,
                                                   check_converged, check_unbounded)]
    checks.append(check_gradient_free(rows, plan, args))
    verdicts = {True: "PASS", False: "FAIL", None: "N/A"}
    lines += ["## Sanity checks (Carlini et al. 2019, \"On Evaluating Adversarial Robustness\")", ""]
    lines += [f"{number}. **{verdicts[ok]}** {text}" for number, (ok, text) in enumerate(checks, 1)]
    if args.defenses:
        lines += ["", defense_table(rate, kept, plan, args)]
    return "\n".join(lines).rstrip() + "\n"


def figures(rate, kept, plan, args):
    """{file name: figure}: success against epsilon and steps per method, and through each defense."""
    if not plan.methods:
        return {}
    methods, epsilon, steps = plan.methods, max(args.epsilons), max(args.steps)
    # bars, not lines: attacks that all reach 100% (or 0%) would hide each other's lines
    series = [(m, {"color": f"C{k}"}) for k, m in enumerate(methods)]  # a method's colour is the same in both
    by_epsilon = {(f"{e:g}", m): rate[Job(m, e, top_steps(m, args))] for e in args.epsilons for m in methods}
    all_steps = [*args.steps, 2 * steps]
    by_steps = {(str(s), m): rate[Job(m, epsilon, s)] if ATTACKS[m].iterative or s == 1 else None
                for s in all_steps for m in methods}
    result = {"success_vs_epsilon.png": grouped_bars_figure(
                  [("", by_epsilon)], [f"{e:g}" for e in args.epsilons], series, "attack success rate (%)",
                  f"success per epsilon (levels out of 255), at the largest steps ({steps}; fgsm: 1)"),
              "success_vs_steps.png": grouped_bars_figure(
                  [("", by_steps)], [str(s) for s in all_steps], series, "attack success rate (%)",
                  f"success per number of steps, at epsilon {epsilon:g} (fgsm: one step only)")}
    if args.defenses:
        method = defense_method(methods)
        attacks = ("plain", "adaptive") if args.adaptive else ("plain",)
        series = [("clean accuracy kept", {"color": "0.6"})] + \
            [(f"{attack} {method} success", {"color": "C0" if attack == "plain" else "C3"}) for attack in attacks]
        panels = []
        for epsilon in args.epsilons:
            values = {}
            for defense in args.defenses:
                values[defense, series[0][0]] = kept[Job(method, epsilon, steps, defense)]
                for attack, (name, _) in zip(attacks, series[1:]):
                    values[defense, name] = rate[Job(method, epsilon, steps, defense, attack)]
            panels.append((f"epsilon {epsilon:g}", values))
        result["defenses.png"] = grouped_bars_figure(
            panels, list(args.defenses), series, "% of photos",
            f"{method}, {steps} steps: judged on the PNG read back, through the real defense")
    return result


def write_report(rows, photos, plan, skipped, out, args, context):
    """summary.md, robust_accuracy.csv (with the ensemble) and the figures, from this plan's rows."""
    jobs, names = set(plan.jobs), set(photos.names)
    rows = [row for row in rows if job_of(row) in jobs and row["image"] in names]
    rate = group_mean(rows, lambda row: int(row["success"]))
    kept = group_mean(rows, lambda row: int(row["clean_defended_label"] == row["clean_label"]))
    accuracy = robust_accuracy(rows, plan, args) if plan.ensemble else []
    if accuracy:
        with atomic_path(out / "robust_accuracy.csv") as temp, open(temp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ACCURACY_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(accuracy)
    summary = save_text(summary_markdown(rows, rate, kept, accuracy, photos, plan, skipped, args, context),
                        out / "summary.md")
    for name, figure in figures(rate, kept, plan, args).items():
        save_figure(figure, out / name)
        plt.close(figure)
    return summary, len(rows)
