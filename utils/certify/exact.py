"""--method exact: exact verification of a ReLU network by mixed-integer linear programming (Tjeng, Xiao and Tedrake
2019, "Evaluating Robustness of Neural Networks with Mixed Integer Programming"), solved by HiGHS.

Per image and epsilon (ascending), in order of cost:
1. misclassified when clean: "misclassified" at every epsilon.
2. an attack (PGD on the 8-bit lattice, L-infinity only) whose image the model classifies wrong: "not robust"
   (found_by "attack"); once not robust at one epsilon, the same counterexample is within every larger budget.
3. the margin bounds (utils.certify.propagation, on tensors: interval, then CROWN, then alpha-CROWN, each only when
   the one before proved nothing) all above zero: "robust" (found_by "bounds").
4. branch and bound over ReLU splits with beta-CROWN's bounds (utils.certify.branch), for half the time limit (the
   whole of it when the MILP is too large to run, below): every sub-problem proved is "robust" (found_by "bab"); a
   bound's minimizing input that the model classifies wrong is "not robust" (found_by "bab"). The domains column
   counts the sub-problems it bounded.
5. the MILP (utils.certify.milp) for the classes the bounds left open, when it has at most MILP_MAX_BINARIES binaries
   (the binaries column counts them either way): infeasible is "robust" (found_by "milp");
   a point found is a counterexample only when the model's own forward on its 8-bit image classifies it wrong and it
   is within the budget (the solver's tolerances are not trusted); with the lattice (the default) the continuous
   program runs first (infeasible there proves the lattice too, and its point rounded often is one), then the
   integer one. If the `time_limit` (seconds per image and epsilon, counted from the attack's start) runs out:
   "unknown", with the bounds' proved lower bound on the margin.

L-infinity epsilon in levels out of 255; L1 epsilon in [0, 1] pixel units, summed over the whole (3, H, W) image.
On the lattice (the default) the inputs are whole levels, so robust and not robust are exact for PNG files;
`continuous` verifies the real-valued ball (its counterexample is saved only where its rounding is one too).
"""
import time
from dataclasses import dataclass

import numpy as np

from utils.attacks import run_attack
from utils.certify.base import MISCLASSIFIED, NOT_ROBUST, ROBUST, UNKNOWN, Certifier, Settings
from utils.certify.bounds_certifier import bound_ladder, clean_prediction, model_logits, network_of, tensor_net
from utils.certify.propagation import ALPHA_ITERATIONS
from utils.certify.bounds import make_ball
from utils.cli import number_in
# scipy is imported where it is used (utils/certify/__init__.py says why)

THRESHOLD = 1e-4  # the program looks for margins <= this: a point at 0 up to HiGHS's tolerances is still caught
ATTACK_STEPS = 50
BRANCH_SHARE = 0.5  # of --time-limit for branch and bound; the MILP gets what is left
# HiGHS does not stop at its time limit inside its first relaxation of a large program: on the PGD-trained digits
# CNN at 8 levels (16,530 binaries, 84,868 rows) it took 27 s against a limit of 3. The MLP's programs have at most
# its 200 ReLUs' binaries. Larger programs are not solved (a size rule, not a timing); branch and bound gets the time
MILP_MAX_BINARIES = 2000


@dataclass(frozen=True)
class ExactSettings(Settings):
    norm: str = "Linf"
    lattice: bool = True
    time_limit: float = 60.0
    seed: int = 0
    alpha_iterations: int = ALPHA_ITERATIONS
    batch_size: int = 1000


def within_budget(candidate_u8, image_u8, norm, epsilon):
    change = np.abs(candidate_u8.astype(np.int64) - image_u8.astype(np.int64))
    if norm == "Linf":
        return change.max() <= epsilon + 1e-9
    return change.sum() / 255 <= epsilon + 1e-9


def as_image(levels, shape):
    """Flat channel-first levels as an 8-bit (H, W, 3) image."""
    channels, height, width = shape
    return np.clip(np.round(levels), 0, 255).astype(np.uint8).reshape(channels, height, width).transpose(1, 2, 0)


class ExactCertifier(Certifier):
    name = "exact"
    norms = ("Linf", "L1")
    columns = ("found_by", "margin_bound", "domains", "binaries", "constraints")
    description = "exact verification (MILP, HiGHS)"

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--continuous", action="store_true",
                            help="exact, bounds: verify the real-valued ball, not only the 8-bit images in it")
        parser.add_argument("--time-limit", type=number_in(0, 1e6, low_open=True, name="--time-limit"), default=60.0,
                            help="exact: seconds of solver time per image and epsilon before the verdict is unknown "
                                 "(default: %(default)s)")

    @classmethod
    def from_options(cls, norm="Linf", continuous=False, time_limit=60.0, seed=0, alpha_iterations=ALPHA_ITERATIONS,
                     batch_size=1000, **_):
        return ExactSettings(norm, not continuous, time_limit, seed, alpha_iterations, batch_size)

    def __init__(self, model, settings, device="cpu", image_shape=None):
        super().__init__(model, settings, device)
        self.network = network_of(model, image_shape)
        self.net, self.dtype = tensor_net(self.network, device)

    def misclassified(self, candidate_u8, image_u8, label, epsilon):
        """The model's own verdict on a candidate: wrong and within the budget."""
        prediction = int(np.argmax(model_logits(self.model, candidate_u8)[0]))
        return prediction != label and within_budget(candidate_u8, image_u8, self.config.norm, epsilon)

    def attack(self, image_u8, label, epsilon):
        if self.config.norm != "Linf":
            return None
        adversarial, _ = run_attack(self.model, "pgd", [image_u8], [label], epsilon=np.floor(epsilon + 1e-9),
                                    steps=ATTACK_STEPS, targeted=False, random_start=True, seed=self.config.seed)
        return adversarial[0] if self.misclassified(adversarial[0], image_u8, label, epsilon) else None

    def certify(self, image_u8, label, epsilons):
        prediction = clean_prediction(self.model, image_u8)
        rows, found = [], None
        for epsilon in epsilons:
            started = time.perf_counter()
            if prediction != label:
                row = dict(verdict=MISCLASSIFIED, found_by="", margin_bound="", domains="", binaries="", constraints="")
            elif found is not None and self.misclassified(found[0], image_u8, label, epsilon):
                row = dict(verdict=NOT_ROBUST, found_by=found[1], margin_bound="", domains="", binaries="",
                           constraints="", counterexample=found[0])
            else:
                row = self.decide(image_u8, label, epsilon)
                if row.get("counterexample") is not None:
                    found = (row["counterexample"], row["found_by"])
            rows.append({"epsilon": epsilon, "prediction": prediction, "seconds": time.perf_counter() - started,
                         "counterexample": None, **row})
        return rows

    def decide(self, image_u8, label, epsilon):
        from utils.certify.milp import MarginProgram
        config = self.config
        deadline = time.perf_counter() + config.time_limit
        attacked = self.attack(image_u8, label, epsilon)  # a counterexample needs no search
        if attacked is not None:
            return dict(verdict=NOT_ROBUST, found_by="attack", margin_bound="", domains="", binaries="",
                        constraints="", counterexample=attacked)
        found, margins, tensor_bounds, box = bound_ladder(self.net, self.dtype, self.device, image_u8, label,
                                                          config.norm, epsilon, config.lattice, "alpha-crown",
                                                          config.alpha_iterations, until_proved=True,
                                                          deadline=deadline)
        bound = max(found.values())
        if bound > 0:
            return dict(verdict=ROBUST, found_by="bounds", margin_bound=bound, domains=0, binaries=0, constraints=0)
        # the program's big-Ms from CROWN's layer bounds; the classes to ask about from alpha-CROWN's margin bounds
        bounds = [(lower[0].cpu().double().numpy(), upper[0].cpu().double().numpy()) for lower, upper in tensor_bounds]
        ball = make_ball(image_u8, config.norm, epsilon, config.lattice)
        program = MarginProgram(self.network, ball, bounds, lattice=False)
        solvable = program.binaries <= MILP_MAX_BINARIES
        until = deadline - (1 - BRANCH_SHARE) * config.time_limit if solvable else deadline
        searched, domains = self.branch(image_u8, label, epsilon, tensor_bounds, box, until)
        if searched is not None:
            return searched
        size = dict(margin_bound=float(margins.min()), domains=domains, binaries=program.binaries,
                    constraints=program.constraint_count)
        if not solvable:
            return dict(verdict=UNKNOWN, found_by="", **size)
        return self.solve(image_u8, label, epsilon, ball, bounds, margins, program, size, deadline)

    def branch(self, image_u8, label, epsilon, bounds, box, until):
        """Branch and bound (utils.certify.branch) until the clock reads `until`: (its row when it decides, else
        None: the MILP gets the rest of the time; the sub-problems it bounded)."""
        from utils.certify.branch import branch_and_bound
        shape = self.network.input_shape

        def is_counterexample(pixels):
            return self.misclassified(as_image(pixels.cpu().double().numpy() * 255, shape), image_u8, label, epsilon)

        outcome = branch_and_bound(self.net, bounds, box, label, is_counterexample, until, self.config.batch_size,
                                   self.config.alpha_iterations)
        if outcome.verdict == ROBUST:
            return dict(verdict=ROBUST, found_by="bab", margin_bound="", domains=outcome.domains, binaries=0,
                        constraints=0), outcome.domains
        if outcome.verdict == NOT_ROBUST:
            return dict(verdict=NOT_ROBUST, found_by="bab", margin_bound="", domains=outcome.domains, binaries="",
                        constraints="", counterexample=as_image(outcome.candidate * 255, shape)), outcome.domains
        return None, outcome.domains

    def solve(self, image_u8, label, epsilon, ball, bounds, margins, program, size, deadline):
        """The MILP: `program` (the continuous ball's), then on the lattice the integer one, until `deadline`."""
        from utils.certify.milp import MarginProgram
        targets = np.flatnonzero(margins <= 0)
        for lattice in ([False, True] if self.config.lattice else [False]):
            if lattice:
                program = MarginProgram(self.network, ball, bounds, lattice=True)
                size.update(binaries=program.binaries, constraints=program.constraint_count)
            answer = program.solve(label, targets, THRESHOLD, deadline - time.perf_counter(), bounds[-1])
            if answer.status == "infeasible":
                return dict(verdict=ROBUST, found_by="milp", **size)
            if answer.status == "found":
                candidate = as_image(answer.levels, self.network.input_shape)
                if self.misclassified(candidate, image_u8, label, epsilon):
                    return dict(verdict=NOT_ROBUST, found_by="milp", counterexample=candidate, **size)
                if not self.config.lattice:  # a real point the rounding undoes: the ball is not robust, no file
                    real = model_logits_real(self.model, answer.levels, self.network.input_shape)
                    if int(np.argmax(real)) != label:
                        return dict(verdict=NOT_ROBUST, found_by="milp", **size)
            if time.perf_counter() >= deadline:
                break
        return dict(verdict=UNKNOWN, found_by="", **size)


def model_logits_real(model, levels, shape):
    import torch
    pixels = torch.from_numpy(np.clip(levels / 255, 0, 1).reshape(1, *shape)).float().to(model.mean.device)
    with torch.no_grad():
        return model(pixels)[0].double().cpu().numpy()
