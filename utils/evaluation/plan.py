"""The vocabulary of an evaluation: a Job (one attack setting run on the photos that need it), the Plan (the jobs of
a run, in order) and the Settings (how the run computes, besides what it runs), shared by step 8, which decides the
plan, by the engine, which runs it, and by the results files and the report, which record and summarize its rows.
The small rules here say which budget a method's headline number and an ensemble stage use."""
from dataclasses import dataclass

from utils.attacks import ATTACKS
from utils.cli import UsageError
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


def stage_steps(method, settings):
    """An ensemble stage's budget: the largest --steps, or --queries for a gradient-free attack."""
    return settings.queries if ATTACKS[method].gradient_free else max(settings.steps)


# AutoAttack's standard version (Croce and Hein 2020; pyautoattack's autoattack.py, version "standard"): in every norm
# APGD-CE, APGD-T, FAB-T and Square (5,000 queries); in L1 APGD-CE with 5 restarts and APGD-T with 5 target classes
# (and the growing epsilon of l1-APGD, our APGD's default in L1). A stage whose attack has no version in the norm is
# left out: the ensemble is the standard one as far as this library offers it (utils.attacks: which norms each has).
STANDARD_ENSEMBLE = ("apgd", "apgd-t", "fab", "square")
L1_SETTINGS = {"apgd": {"restarts": 5}, "apgd-t": {"target_classes": 5}}


def standard_ensemble(norm):
    """The default ensemble in `norm`: AutoAttack's standard attacks that have a version in that norm, in order."""
    return [method for method in STANDARD_ENSEMBLE if norm in ATTACKS[method].norms]


def check_ensemble(ensemble, norm, flag="--ensemble"):
    """Every attack of `ensemble` exists and has a version in `norm` (UsageError naming the first that does not):
    checked before a model loads or a file is written, by step 8 (`flag` --ensemble) and the library call."""
    unknown = [method for method in ensemble if method not in ATTACKS]
    if unknown:
        raise UsageError(f"{flag}: unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}")
    check_methods(ensemble, norm, f"{flag}:")


def ensemble_jobs(ensemble, epsilons, settings):
    """The ensemble's stages, per epsilon in the order given, each at its budget (`stage_steps`): the jobs that
    measure robust accuracy, in step 8's plan and in the library call alike."""
    return [Job(method, epsilon, stage_steps(method, settings), attack="ensemble")
            for epsilon in epsilons for method in ensemble]


def stage_options(method, settings):
    """The options AutoAttack's standard version gives a stage in the run's norm (--target-classes, when given,
    wins)."""
    options = dict(L1_SETTINGS.get(method, {})) if settings.norm == "L1" else {}
    if settings.target_classes is not None:
        options["target_classes"] = settings.target_classes
    return options
