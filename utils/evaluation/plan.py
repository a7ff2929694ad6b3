"""The vocabulary of an evaluation: a Job (one attack setting run on the photos that need it), the Plan (the jobs of
a run, in order) and the Settings (how the run computes, besides what it runs), shared by step 8, which asks for the
plan, by the engine, which runs it, and by the results files and the report, which record and summarize its rows.
The small rules here say which budget a method's headline number and an ensemble stage use, and `make_plan` decides
what a run does (the grid, its sanity checks' extra runs, the defenses, the ensemble) from explicit parameters."""
from dataclasses import dataclass

from utils.attacks import ATTACKS
from utils.cli import UsageError
from utils.models import DEFAULT_TARGET, find_class
from utils.threat import check_methods

UNBOUNDED = 255.0


@dataclass(frozen=True)
class Job:
    """One setting, run on the photos of each batch that need it. attack: "plain" (against the bare model, judged
    bare with defense "none" or through a defense), "adaptive" (BPDA(+EOT) through the defense), "ensemble" (an
    ensemble stage, on the photos every earlier stage failed to fool) or "clean" (no attack: the photo as it is)."""
    method: str
    epsilon: float
    steps: int
    defense: str = "none"
    attack: str = "plain"

    @property
    def folder(self):
        if self.attack == "clean":
            return "images/clean"
        prefix = {"adaptive": f"adaptive_{self.defense}_", "ensemble": "ensemble_"}.get(self.attack, "")
        return f"images/{prefix}{self.method}_eps{self.epsilon:g}_steps{self.steps}"

    @property
    def makes_images(self):
        return self.defense == "none" or self.attack == "adaptive"

    def key(self, image):
        return image, self.method, f"{self.epsilon:g}", str(self.steps), self.defense, self.attack


CLEAN = Job("none", 0.0, 0, attack="clean")


def job_of(row):
    return Job(row["method"], float(row["epsilon"]), int(row["steps"]), row["defense"], row["attack"])


@dataclass
class Plan:
    """What runs, resolved from the arguments: the grid's methods (empty: no grid), the ensemble, the goal."""
    methods: list
    ensemble: list
    target: object  # the target class of the grid, None when untargeted
    jobs: list
    classes: tuple = None  # the model's class names (None: ImageNet's), which name the target in the report

    def stages_at(self, epsilon):
        """The ensemble's jobs at `epsilon`, in the order they run."""
        return [job for job in self.jobs if job.attack == "ensemble" and job.epsilon == epsilon]


@dataclass(frozen=True)
class Settings:
    """How an evaluation computes and what its report says of it: the threat model `norm` ("Linf", "L2" or "L1";
    one per run: --resume refuses rows of another), the budgets (`epsilons` in the norm's units, utils.threat:
    levels in Linf, [0, 1] pixel units in L2 and L1; `steps` of the iterative methods, `queries` of a gradient-free one, `target_classes` of apgd-t), the defenses and whether the
    attack goes through them (`adaptive`, with `eot` draws), the attacks' `seed`, `early_stop`, `precision` and the
    model's `memory_format` (resolved: never "auto"), the batching (`batch_size`, loader `workers`), `resume`, and
    the names of the `model` and the `folder` for the report."""
    model: str
    folder: str
    epsilons: tuple
    steps: tuple
    queries: int = 5000
    target_classes: int = None  # apgd-t's and fab's: None for AutoAttack's (9; apgd-t 5 in L1)
    restarts: int = None  # the ensemble's apgd's: None for AutoAttack's (1; 5 in L1)
    defenses: tuple = ()
    adaptive: bool = False
    eot: int = 1
    seed: int = 0
    early_stop: bool = True
    precision: str = "fp32"
    memory_format: str = "contiguous"
    batch_size: int = 16
    workers: int = 0
    resume: bool = False
    norm: str = "Linf"


def iterative_methods(methods):
    return [method for method in methods if ATTACKS[method].iterative]


def defense_method(methods):
    return "pgd" if "pgd" in methods else next(iter(iterative_methods(methods)), "pgd")


def top_steps(method, settings):
    """The steps a method's headline number uses: the largest, or 1 for a one-step attack."""
    return max(settings.steps) if ATTACKS[method].iterative else 1


def stage_budget(method, steps, queries):
    """An ensemble stage's budget: the largest of `steps`, or `queries` for a gradient-free attack."""
    return queries if ATTACKS[method].gradient_free else max(steps)


def stage_steps(method, settings):
    """An ensemble stage's budget in a run of `settings`: the largest --steps, or --queries for a gradient-free
    attack."""
    return stage_budget(method, settings.steps, settings.queries)


# AutoAttack's standard version (Croce and Hein 2020; pyautoattack's autoattack.py, version "standard"): in every norm
# APGD-CE, APGD-T, FAB-T and Square (5,000 queries); in L1 APGD-CE with 5 restarts and APGD-T with 5 target classes
# (and the growing epsilon of l1-APGD, our APGD's default in L1). A stage whose attack has no version in the norm is
# left out: the ensemble is the standard one as far as this library offers it (utils.attacks: which norms each has).
STANDARD_ENSEMBLE = ("apgd", "apgd-t", "fab", "square")
L1_SETTINGS = {"apgd": {"restarts": 5}, "apgd-t": {"target_classes": 5}}


def standard_ensemble(norm):
    """The default ensemble in `norm`: AutoAttack's standard attacks that have a version in that norm, in order."""
    return [method for method in STANDARD_ENSEMBLE if norm in ATTACKS[method].norms]


# --ensemble fast: APGD-CE (one restart, in L1 too), then APGD-T towards the 3 classes the model ranks highest after
# the true one (the standard version goes towards 9), without FAB-T and Square: the stages that fooled every image the
# standard ensemble fooled on the digits models of `make robust-demo` and `make certify-demo` (bench/fast_ensemble.py,
# docs/speed.md). It gives up the standard version's second opinions, a gradient-free attack (Square) and a
# minimal-distance one (FAB-T), that catch a model whose gradients mislead: judge a new defense with the standard one.
FAST_ENSEMBLE = ("apgd", "apgd-t")
FAST_TARGET_CLASSES = 3
FAST_RESTARTS = 1
NAMED_ENSEMBLES = ("standard", "fast")


def named_ensemble(name, norm, target_classes=None):
    """(attacks, target classes, restarts) of the ensemble called `name` ("standard" or "fast") in `norm`; a
    `target_classes` given wins over the fast ensemble's (None keeps each attack's default)."""
    if name == "fast":
        return ([method for method in FAST_ENSEMBLE if norm in ATTACKS[method].norms],
                target_classes or FAST_TARGET_CLASSES, FAST_RESTARTS)
    return standard_ensemble(norm), target_classes, None


def check_ensemble(ensemble, norm, flag="--ensemble"):
    """Every attack of `ensemble` exists and has a version in `norm` (UsageError naming the first that does not):
    checked before a model loads or a file is written, by step 8 (`flag` --ensemble) and the library call."""
    unknown = [method for method in ensemble if method not in ATTACKS]
    if unknown:
        raise UsageError(f"{flag}: unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}")
    check_methods(ensemble, norm, f"{flag}:")


def ensemble_jobs(ensemble, epsilons, steps, queries):
    """The ensemble's stages, per epsilon in the order given, each at its budget (`stage_budget` of `steps` and
    `queries`): the jobs that measure robust accuracy, in step 8's plan and in the library call alike."""
    return [Job(method, epsilon, stage_budget(method, steps, queries), attack="ensemble")
            for epsilon in epsilons for method in ensemble]


def stage_options(method, settings):
    """The options AutoAttack's standard version gives a stage in the run's norm (--target-classes, when given,
    wins)."""
    options = dict(L1_SETTINGS.get(method, {})) if settings.norm == "L1" else {}
    if settings.target_classes is not None:
        options["target_classes"] = settings.target_classes
    if settings.restarts is not None and method == "apgd":
        options["restarts"] = settings.restarts
    return options


# ---- the plan -------------------------------------------------------------------------------------------------

# the grid's default methods per norm: the tutorial's three in L-infinity, the gradient attacks that have the norm else
DEFAULT_METHODS = {"Linf": ("fgsm", "pgd", "mifgsm"), "L2": ("pgd", "apgd"), "L1": ("apgd",)}


def grid_jobs(methods, epsilons, steps, norm, defenses=(), adaptive=False):
    """The grid (every method x epsilon x steps; a one-step method once per epsilon), the sanity checks' extra runs
    (twice the largest steps at the largest epsilon; in L-infinity pgd unbounded), then the defense evaluation: the
    plain attack's PNGs, judged through each of `defenses` (and with `adaptive` attacked through it)."""
    largest_epsilon, largest_steps = max(epsilons), max(steps)
    jobs = [Job(method, epsilon, count) for method in methods for epsilon in epsilons
            for count in (steps if ATTACKS[method].iterative else [1])]
    jobs += [Job(method, largest_epsilon, 2 * largest_steps) for method in iterative_methods(methods)]
    if norm == "Linf":  # the unbounded sanity run: L-infinity's 255 levels (see checks.check_unbounded)
        jobs.append(Job("pgd", UNBOUNDED, largest_steps))
    method, attacks = defense_method(methods), ("plain", "adaptive") if adaptive else ("plain",)
    for defense in defenses:  # the plain attack's PNGs first, then judged through each defense
        jobs += [Job(method, epsilon, largest_steps) for epsilon in epsilons]
        jobs += [Job(method, epsilon, largest_steps, defense, attack) for epsilon in epsilons for attack in attacks]
    return jobs


def check_attacks(ensemble, methods, norm):
    """Every attack asked for (the `ensemble`'s and the grid's `methods`; None: none) exists and has a version in
    `norm`: checked before the model loads or a file is written."""
    check_ensemble(ensemble or [], norm)
    check_methods(methods or [], norm, "--methods:")


def make_plan(labelled, epsilons, steps, norm, classes=None, methods=None, ensemble=None, target=None,
              untargeted=False, defenses=(), adaptive=False, queries=5000):
    """Decide what runs on photos with true labels (`labelled`) or without, at `epsilons` (in `norm`'s units) and
    `steps`. With labels and no `methods` (nor `defenses`) only the ensemble runs (None: AutoAttack's standard one
    in `norm`; [] none), its gradient-free stages at `queries`; the grid runs when `methods` is given (None: the
    norm's DEFAULT_METHODS), without labels, or for `defenses`. The grid aims at `target` (a class index or name
    among `classes`, None: DEFAULT_TARGET) unless `untargeted` or labelled without a target."""
    if adaptive and not defenses:
        raise UsageError("`adaptive` attacks through a defense: give `defenses` too", "adaptive", "defenses")
    if ensemble and not labelled:
        raise UsageError("`ensemble` measures robust accuracy: it needs true labels (an ImageFolder tree or `labels`)",
                         "ensemble", "labels")
    if ensemble and target is not None:
        raise UsageError("`ensemble` measures untargeted robustness: it excludes `target`", "ensemble", "target")
    ensemble = ensemble if ensemble is not None else (
        standard_ensemble(norm) if labelled and target is None else [])
    check_attacks(ensemble, methods, norm)
    grid = methods is not None or not labelled or bool(defenses)
    grid_methods = (methods or list(DEFAULT_METHODS[norm])) if grid else []
    untargeted = untargeted or (labelled and target is None)
    goal = None if untargeted else find_class(target or DEFAULT_TARGET, classes)
    jobs = [CLEAN] if labelled else []
    jobs += grid_jobs(grid_methods, epsilons, steps, norm, defenses, adaptive) if grid else []
    jobs += ensemble_jobs(ensemble, epsilons, steps, queries)
    return Plan(grid_methods, ensemble, goal, list(dict.fromkeys(jobs)), classes)
