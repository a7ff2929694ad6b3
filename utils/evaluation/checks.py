"""The sanity checks of Carlini et al. 2019 ("On Evaluating Adversarial Robustness") on an evaluation's results:
each check takes the rows, the success rate per job, the plan and the settings, and returns (verdict, text): True
(PASS), False (FAIL) or None (N/A: the plan has nothing to check), and a sentence with the numbers behind it.
The report (utils/evaluation/report.py) formats them."""
from itertools import pairwise

from utils.attacks import ATTACKS
from utils.evaluation.interval import proved_robust
from utils.evaluation.plan import UNBOUNDED, Job, iterative_methods, job_of, top_steps


def percent(rate):
    return f"{100 * rate:.1f}%"


def check_iterative_beats_one_step(rows, rate, plan, settings):
    iterative, one_step = iterative_methods(plan.methods), [m for m in plan.methods if not ATTACKS[m].iterative]
    text = "iterative attacks at least as strong as one-step ones (per epsilon)"
    if not iterative or not one_step:
        return None, text + ": needs a one-step method (fgsm) and an iterative one in --methods"
    cell = {(method, epsilon): rate[Job(method, epsilon, top_steps(method, settings))]
            for method in plan.methods for epsilon in settings.epsilons}
    ok = all(cell[m, epsilon] >= cell[f, epsilon] for m in iterative for f in one_step for epsilon in settings.epsilons)
    parts = [f"epsilon {epsilon:g}: " + ", ".join(f"{m} {percent(cell[m, epsilon])}" for m in plan.methods)
             for epsilon in settings.epsilons]
    return ok, f"{text}: " + "; ".join(parts)


def check_monotone(rows, rate, plan, settings):
    text = "success never falls as epsilon grows (per method, epsilon " + \
        ", ".join(f"{epsilon:g}" for epsilon in settings.epsilons) + ")"
    if not plan.methods:
        return None, text + ": needs the --methods grid"
    parts = [f"{method} " + " -> ".join(percent(rate[Job(method, epsilon, top_steps(method, settings))])
                                        for epsilon in settings.epsilons) for method in plan.methods]
    ok = all(later >= earlier for method in plan.methods for earlier, later in
             pairwise(rate[Job(method, epsilon, top_steps(method, settings))] for epsilon in settings.epsilons))
    return ok, f"{text}: " + "; ".join(parts)


def check_converged(rows, rate, plan, settings):
    epsilon, steps = max(settings.epsilons), max(settings.steps)
    text = f"doubling the steps ({steps} -> {2 * steps}, epsilon {epsilon:g}) changes success by under 1 point"
    methods = iterative_methods(plan.methods)
    if not methods:
        return None, text + ": needs an iterative method in --methods"
    changes = {m: 100 * (rate[Job(m, epsilon, 2 * steps)] - rate[Job(m, epsilon, steps)]) for m in methods}
    parts = [f"{m} {percent(rate[Job(m, epsilon, steps)])} -> {percent(rate[Job(m, epsilon, 2 * steps)])} "
             f"({changes[m]:+.1f} points)" for m in methods]
    return all(abs(change) < 1 for change in changes.values()), f"{text}: " + "; ".join(parts)


def check_unbounded(rows, rate, plan, settings):
    steps = max(settings.steps)
    text = f"an unbounded budget (pgd, epsilon 255, {steps} steps) reaches 100%"
    if not plan.methods:
        return None, text + ": needs the --methods grid"
    if settings.norm != "Linf":
        return None, text + f": run in L-infinity only (this run is {settings.norm})"
    success = rate[Job("pgd", UNBOUNDED, steps)]
    return success == 1, f"{text}: {percent(success)}"


def check_gradient_free(rows, rate, plan, settings):
    """Square runs on the photos every earlier (gradient) attack failed on: if it fools any, gradients are masked or
    a gradient attack is broken (Carlini et al. 2019)."""
    text = "the gradient-free attack fools no image that the gradient attacks failed on (same epsilon)"
    checked = [stage for epsilon in settings.epsilons for k, stage in enumerate(plan.stages_at(epsilon))
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


SANITY_CHECKS = (check_iterative_beats_one_step, check_monotone, check_converged, check_unbounded, check_gradient_free)


def check_proved_not_fooled(rows, certified, plan, settings):
    """With --certify: no photo is both proved robust and fooled by an ensemble attack at the same epsilon. A proof
    and a successful attack on the same photo and budget contradict each other: the verifier or the attack (or its
    judge) is wrong."""
    text = "no photo is both proved robust and fooled by an attack (same epsilon)"
    fooled = {(float(row["epsilon"]), row["image"]) for row in rows
              if row["attack"] == "ensemble" and row["success"] == "1"}
    parts, ok = [], True
    for epsilon in settings.epsilons:
        for name, found in certified.items():
            both = sorted(image for image in proved_robust(found, epsilon) if (epsilon, image) in fooled)
            ok &= not both
            parts.append(f"epsilon {epsilon:g}, {name}: {len(proved_robust(found, epsilon))} proved, "
                         f"{len(both)} of them fooled" + (f" ({', '.join(both[:5])})" if both else ""))
    return ok, f"{text}: " + "; ".join(parts)
