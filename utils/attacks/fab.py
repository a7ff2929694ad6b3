"""FAB-T: the fast adaptive boundary attack towards each of the top classes, which looks for the smallest perturbation."""
import torch

from utils.attacks import norms
from utils.attacks.base import Attack, AttackResult, OverTopTargets
from utils.attacks.lattice import fill_largest_first, lattice_sizes
from utils.attacks.projection import room_towards, solve_capped
from utils.attacks.rows import indicator


def _fill_largest_first(weight, room, capacity, goal):
    """The fractional knapsack of FAB's L1 step: per row, m_i in [0, room_i] with sum weight_i m_i = goal, filling
    the coordinates in decreasing order of weight (ties in index order), the last one partly (fill_largest_first:
    every coordinate above the weight where the filling ends is full, those at it fill in index order while the
    tied capacity ahead of them is under what is left; `capacity` is weight * room)."""
    fill = fill_largest_first(weight, capacity, goal)
    rows, columns = (fill.tied & (fill.before < fill.left)).nonzero(as_tuple=True)  # the few filled partly
    before = fill.before[rows, columns] if fill.before.dim() else fill.before
    part = ((fill.left[rows, 0] - before) / weight[rows, columns].clamp_min(1e-30)).clamp(min=0).to(weight.dtype)
    moved = room * fill.above.to(room.dtype)  # a float mask: indicator says why
    moved[rows, columns] = torch.minimum(part, room[rows, columns])
    return moved


def normal_parts(normal, norm):
    """What hyperplane_step needs of the normal (B, n) alone, computed once for every point projected onto the same
    hyperplanes (FAB projects two): the signs, |normal|, and in L2 |normal| floored at 1e-30 (the breaks' divisor) and
    its square (the slopes), in L-infinity 1.0 where |normal| > 0 (the coordinates that move)."""
    weight = normal.abs()
    if norm == "L2":
        extra = (weight.clamp_min(1e-30), weight * weight)
    elif norm == "Linf":
        extra = (indicator(torch.gt, weight, 0),)
    else:
        extra = ()
    return (normal.sign(), weight) + extra


def hyperplane_step(point, normal, offset, norm, parts=None):
    """The smallest step d in `norm` from `point` (B, n) in [0, 1] onto the hyperplane {normal . d = offset} inside
    the box (0 <= point + d <= 1), exactly; where the box cannot reach the hyperplane, the step that goes as far as it
    can towards it (FAB's projection, Croce and Hein 2020, section 3.1). `parts`: normal_parts(normal, norm), when
    the caller has them.

    Every coordinate moves in the direction sign(offset * normal_i), by m_i in [0, room_i], with sum |normal_i| m_i =
    |offset|: in L-infinity m_i = min(t, room_i), in L2 m_i = min(t |normal_i|, room_i) (t found exactly by
    solve_capped), in L1 the coordinates with the largest |normal_i| are filled first (a fractional knapsack)."""
    signs, weight, *extra = parts or normal_parts(normal, norm)
    direction = torch.sign(offset).view(-1, 1) * signs
    room = room_towards(direction.clamp_min(0), point)  # direction is -1, 0 or 1
    goal = offset.abs()
    capacity = weight * room
    reachable = capacity.sum(dim=1) >= goal
    if not bool(reachable.any()):
        return direction * room
    every = bool(reachable.all())  # the common case: no gathered copies
    w, r, c, g, *e = (x if every else x[reachable] for x in (weight, room, capacity, goal, *extra))
    if norm == "L1":
        moved = _fill_largest_first(w, r, c, g)
    elif norm == "Linf":
        # a coordinate with w = 0 has slope and saturation 0: its break, any finite one, changes no sum; it need not
        # move
        moved = torch.minimum(solve_capped(r, w, c, g).to(w.dtype).view(-1, 1), r).mul_(e[0])
    else:
        floored, slopes = e
        t = solve_capped(r / floored, slopes, c, g).to(w.dtype).view(-1, 1)
        moved = torch.minimum(t * w, r)  # a zero weight need not move: t * w is 0 there already
    if every:
        return direction.mul_(moved)
    move = room.clone()
    move[reachable] = moved
    return direction.mul_(move)


class FAB(OverTopTargets, Attack):
    """FAB-T (Croce and Hein 2020, "Minimally distorted adversarial examples with a fast adaptive boundary attack";
    the targeted version AutoAttack runs): a search for the *smallest* perturbation that changes the class, in
    L-infinity, L2 or L1. At each step the decision boundary between the class to leave and the target is linearized
    at the current 8-bit image (one forward and one backward); the current point and the original are both projected
    onto that hyperplane inside [0, 1] (`hyperplane_step`, exact in each norm), and the next point is the mix
    (1 - a) (x + eta d_x) + a (x_orig + eta d_orig), a = min(|d_x| / (|d_x| + |d_orig|), alpha_max), eta = 1.05 the
    overshoot, alpha_max = 0.1; a point that is adversarial is recorded when it is the smallest so far and pulled back
    towards the original, x_orig + beta (x - x_orig), beta = 0.9, instead of stepping: the next linearization is at
    the point pulled back, as in the reference (one forward and backward per step, no extra forward to check).
    Untargeted (labels = true classes): one such run towards each of the `target_classes` (default 9) classes with
    the largest clean logits, each on the images no earlier run fooled within epsilon; targeted (labels = targets):
    one run to the target, the strongest non-target class as the class to leave (weak where many classes are close:
    crossing one rival meets the next; on a random 1000-class model it reached no target in 100 steps).
    The model always sees the 8-bit image (rounded to whole levels, no budget: FAB is free to cross epsilon); an
    image counts as fooled when its 8-bit image is adversarial and within epsilon, and the returned image is then the
    smallest adversarial 8-bit image found (with the verdict made when it was found: not judged again), else the
    input. `distance` reports, per image, the size of the smallest adversarial 8-bit image found (inf if none), in
    the threat model's units (Linf levels; L2, L1 in [0, 1] units).
    With `early_stop` an image stops once it is fooled within epsilon (its distance is then the smallest found so
    far); without, every step is spent looking for a smaller one.
    Random starts (`random_start`, and every restart after the first) at half epsilon, as the reference's.
    Distance: `norm`. Arguments: target_classes in [1, 999], plus the shared ones (alpha unused)."""
    name = "fab"
    norms = ("Linf", "L2", "L1")
    alpha_max, eta, beta = 0.1, 1.05, 0.9

    def __init__(self, model, target_classes=9, **kwargs):
        kwargs.update(alpha=None)
        super().__init__(model, **kwargs)
        self.target_classes = int(target_classes)

    def loss(self, logits, labels, adversarial, original):
        """The linearized function, to drive below zero: the logit of the class to leave minus the target's."""
        if labels.dim() == logits.dim():
            rival, target = labels[..., 0], labels[..., 1]
        else:
            target = labels
            rival = logits.scatter(-1, labels.unsqueeze(-1), float("-inf")).argmax(dim=-1)
        pick = lambda classes: logits.gather(-1, classes.unsqueeze(-1)).squeeze(-1)  # noqa: E731
        return pick(rival) - pick(target)

    def reached(self, logits, labels):
        if labels.dim() == logits.dim():
            return logits.argmax(dim=-1) != labels[..., 0]
        return super().reached(logits, labels)

    def lattice_size(self, lattice_levels, original_levels):
        """Per image, the size in levels of the 8-bit perturbation, in double precision (whole levels and their
        squares are exact in float32, and so are their sums: lattice_sizes)."""
        steps = (lattice_levels - original_levels).flatten(1)
        if self.norm == "Linf":
            return steps.abs().amax(dim=1).double()
        sizes = lattice_sizes(steps, self.norm)
        return sizes if self.norm == "L1" else sizes.sqrt()

    def starts_at_input(self, restart):
        return not (self.random_start or restart > 0)

    def start(self, original, restart):
        if self.starts_at_input(restart):
            return torch.zeros_like(original)
        return self.random_delta_at(original, restart, 0.5 * self.eps)

    def random_delta_at(self, original, restart, radius):
        generator = torch.Generator().manual_seed(self.seed * 1000 + restart)
        if self.norm == "Linf":
            noise = torch.rand(original.shape[1:], generator=generator).mul_(2).sub_(1)
        else:
            noise = torch.randn(original.shape[1:], generator=generator)
        noise = noise.mul_(radius / norms.size(noise.view(1, -1), self.norm).clamp_min(1e-12))
        return (original + noise.to(original.device)).clamp(0, 1) - original

    def run(self, original, labels, restart, ids, start=None):
        self.original = original
        batch = len(original)
        original_levels = (original * 255).round()
        budget = float(int(self.levels)) if self.norm == "Linf" else self.levels
        delta = self.start(original, restart) if start is None else start.clone()
        best = original.clone()
        best_size = torch.full((batch,), float("inf"), dtype=torch.float64, device=original.device)
        steps_used = torch.full((batch,), self.steps, dtype=torch.long, device=original.device)
        best_predictions = torch.zeros_like(steps_used)
        active = torch.ones(batch, dtype=torch.bool, device=original.device)
        # from zero, the first image judged is the input: its fp32 verdict is the one the result needs where nothing
        # adversarial is found within the budget (below fp32 only successes are confirmed in fp32: judged again)
        from_input = start is None and self.starts_at_input(restart) and self.precision == "fp32"
        input_predictions = None
        for step in range(self.steps + 1):
            last = step == self.steps
            levels = (original_levels + (delta.detach() * 255).round()).clamp_(0, 255)
            image = (levels / 255).requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                loss, reached, logits = self.judge(image, labels)
            with torch.no_grad():
                size = self.lattice_size(levels, original_levels)
                better = reached & active & (size < best_size)
                if bool(better.any()):  # on most steps of a robust image nothing is: no pass over the batch
                    best = torch.where(better.view(-1, 1, 1, 1), image.detach(), best)
                best_size = torch.where(better, size, best_size)
                steps_used = torch.where(better, step, steps_used)
                best_predictions = torch.where(better, logits.argmax(dim=-1), best_predictions)
                if step == 0 and from_input:
                    input_predictions = logits.argmax(dim=-1)
                if self.early_stop:
                    active &= ~(best_size <= budget)
            if last or (self.early_stop and not active.any()):
                break
            if self.on_step:
                self.on_step(step, loss.detach(), logits.detach())
            grad, = torch.autograd.grad(loss.sum(), image)
            with torch.no_grad():
                moved = self.boundary_step(delta, reached, loss.detach(), grad, image.detach())
                delta = moved if bool(active.all()) else torch.where(active.view(-1, 1, 1, 1), moved, delta)
        return self.result(best, best_size, best_predictions, input_predictions, budget, steps_used, labels)

    def boundary_step(self, delta, adversarial, value, grad, lattice):
        """FAB's next delta from the linearization value + grad . (z - lattice) of the current 8-bit image."""
        original = self.original.flatten(1)
        point, normal = (self.original + delta).flatten(1), grad.flatten(1)
        base = value - (normal * lattice.flatten(1)).sum(dim=1)   # the hyperplane: normal . z + base = 0
        # the point and the original projected apart, each row on its own: a batch of both stacked is twice the size,
        # and past glibc's largest mmap threshold (32 MB: a batch of 16 photos) each copy is a fresh mapping whose
        # pages fault in again (utils.speed.keep_freed_memory)
        parts = normal_parts(normal, self.norm)
        to_point, to_original = (hyperplane_step(start, normal, -(base + (normal * start).sum(dim=1)), self.norm, parts)
                                 for start in (point, original))
        lengths = [norms.size(step, self.norm).clamp_min(1e-8) for step in (to_point, to_original)]
        mix = (lengths[0] / (lengths[0] + lengths[1])).clamp(0, self.alpha_max).view(-1, 1)
        # (point + eta to_point) (1 - mix) + (original + eta to_original) mix, in [0, 1]
        moved = to_point.mul_(self.eta).add_(point).mul_(1 - mix)
        moved = moved.add_(to_original.mul_(self.eta).add_(original).mul_(mix)).clamp_(0, 1)
        moved = moved.view_as(delta).sub_(self.original)
        if not bool(adversarial.any()):
            return moved
        # an adversarial point takes the backward step instead: its next linearization is at the point pulled back
        return torch.where(adversarial.view(-1, 1, 1, 1), delta * self.beta, moved)

    def result(self, best, best_size, best_predictions, input_predictions, budget, steps_used, labels):
        """The smallest adversarial image where it is within the budget (judged when it was found), else the input,
        with its prediction (`input_predictions`, or judged now in fp32 where none was given)."""
        within = best_size <= budget
        adversarial = torch.where(within.view(-1, 1, 1, 1), best, self.original)
        if input_predictions is None:
            input_predictions = torch.zeros_like(best_predictions)
            rows = (~within).nonzero().view(-1)
            if len(rows):
                with torch.no_grad():
                    _, _, logits = self.judge(self.original[rows], labels[rows])
                input_predictions[rows] = logits.argmax(dim=-1)
        distance = best_size if self.norm == "Linf" else best_size / 255
        return AttackResult(adversarial, within, torch.where(within, steps_used, self.steps),
                            torch.where(within, best_predictions, input_predictions), distance.float())
