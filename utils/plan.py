"""The vocabulary of an evaluation: a Job (one attack setting run on the photos that need it) and the Plan (the jobs
of a run, in order), shared by step 8, which decides the plan, and by utils.results and utils.report, which record and
summarize its rows. The small rules here say which budget a method's headline number and an ensemble stage use."""
from dataclasses import dataclass

from utils.attacks import ATTACKS

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

    def stages_at(self, epsilon):
        """The ensemble's jobs at `epsilon`, in the order they run."""
        return [job for job in self.jobs if job.attack == "ensemble" and job.epsilon == epsilon]


def iterative_methods(methods):
    return [method for method in methods if ATTACKS[method].iterative]


def defense_method(methods):
    return "pgd" if "pgd" in methods else next(iter(iterative_methods(methods)), "pgd")


def top_steps(method, args):
    """The steps a method's headline number uses: the largest, or 1 for a one-step attack."""
    return max(args.steps) if ATTACKS[method].iterative else 1


def stage_steps(method, args):
    """An ensemble stage's budget: the largest --steps, or --queries for a gradient-free attack."""
    return args.queries if ATTACKS[method].gradient_free else max(args.steps)
