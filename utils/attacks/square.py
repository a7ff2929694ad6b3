"""Square Attack: score-based random search."""
import functools
import hashlib
import itertools
import math

import torch
import torch.nn.functional as F

from utils.attacks.base import Attack, AttackResult, margin
from utils.attacks.lattice import lattice_within


def square_fraction(p_init, query, queries):
    """Square's share of pixels changed per query: p_init, halved at the paper's marks 10, 50, 200, 500, 1000, 2000,
    4000, 6000, 8000 out of 10000 iterations, rescaled to `queries`: the reference's p_selection (pyautoattack's
    square.py, resc_schedule=True), iteration `query` of `queries`."""
    scaled = int(query / queries * 10000)
    return p_init / 2 ** sum(scaled > mark for mark in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))


def square_side(p_init, query, queries, height, width):
    """The window's side at iteration `query`: sqrt(square_fraction * pixels), rounded, in [1, min(height, width)]
    (the reference's rule)."""
    side = round(math.sqrt(square_fraction(p_init, query, queries) * height * width))
    return min(max(side, 1), height, width)


def image_seed(seed, restart, image_id):
    """The seed of one image's draws: a hash of (seed, restart, image id), so that nearby seeds and ids give unrelated
    streams. 32 bits: torch's CPU generator (mt19937) keeps only the low 32 bits of a seed anyway."""
    key = f"{int(seed)},{int(restart)},{int(image_id)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


class SquareDraws:
    """Square's random draws, one generator per image seeded from (seed, restart, the image's id): an image draws the
    same whichever images share its batch, and images of a batch draw independently. Windows and sign orders are
    drawn ahead in blocks of `BLOCK` queries per image, one call per image and block, so a query costs no Python loop
    over images."""
    BLOCK = 256

    def __init__(self, seed, restart, ids, channels, signs):
        self.generators = [torch.Generator().manual_seed(image_seed(seed, restart, i)) for i in ids.tolist()]
        self.channels = channels
        self.signs = signs  # how many sign patterns a window can take (2 ** channels)
        self.start = self.stop = 0

    def stripes(self, width):
        """(B, channels, 1, width) of +-1: one sign per channel and column of each image."""
        return torch.stack([torch.randint(0, 2, (self.channels, 1, width), generator=generator)
                            for generator in self.generators]).mul_(2).sub_(1)

    def uniforms(self, query, count):
        """Iteration `query`'s `count` uniforms in [0, 1) per image (B, count), drawn ahead in blocks."""
        if not self.start <= query < self.stop:
            uniforms = [torch.rand(self.BLOCK, count, dtype=torch.float64, generator=generator)
                        for generator in self.generators]
            self.block = torch.stack(uniforms)
            self.start, self.stop = query, query + self.BLOCK
        return self.block[:, query - self.start]

    def window(self, query):
        """Iteration `query`'s draws, (B,) each: (row, column) of the window's corner as fractions in [0, 1) of the
        free range, and (B, signs) the order in which each image tries the sign patterns."""
        drawn = self.uniforms(query, 2 + self.signs)
        return drawn[:, 0], drawn[:, 1], drawn[:, 2:].argsort(dim=1)

    def tiles(self, count):
        """L2's start: per image and tile (B, count, 1 + channels) uniforms: the tile's transposition coin, then its
        sign per channel."""
        return torch.stack([torch.rand(count, 1 + self.channels, dtype=torch.float64, generator=generator)
                            for generator in self.generators])


SQUARE_TOLERANCE = 1e-5


def centred_rectangles(rows, columns):
    """Square L2's building block (Andriushchenko et al. 2020): a (rows, columns) field that peaks at its centre and
    falls off in nested squares, the square of Chebyshev radius k around the centre adding 1 / (k + 1)^2 to each
    value inside it, normalized to L2 norm 1."""
    centre_row, centre_column = rows // 2, columns // 2
    rings = max(centre_row, centre_column) + 1
    distance = torch.maximum((torch.arange(rows) - centre_row).abs().view(-1, 1),
                             (torch.arange(columns) - centre_column).abs().view(1, -1))
    weights = 1 / torch.arange(1, rings + 1, dtype=torch.float64) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d]: the sum of the weights of every ring from d outwards
    field = tail[distance.clamp(max=rings - 1)].float()
    return field / field.norm()


def square_pattern(side):
    """A side x side window's L2 perturbation pattern: the top half centred rectangles up, the bottom half down,
    normalized to L2 norm 1 (the reference's eta). A fresh tensor each call (made once per side)."""
    return _square_pattern(side).clone()


@functools.lru_cache(maxsize=None)
def _square_pattern(side):
    pattern = torch.cat([centred_rectangles(side // 2, side), -centred_rectangles(side - side // 2, side)])
    return pattern / pattern.norm()


def windows(field, side):
    """Every side x side window of `field` (B, C, H, W) as a view (B, C, H - side + 1, W - side + 1, side, side):
    indexed at each image's corner, [rows, :, top, left], it reads or writes only that image's window."""
    return field.unfold(2, side, 1).unfold(3, side, 1)


def move_mass(delta, shape, signs, corner, side, epsilon):
    """Square L2's query step (the reference's), in place on `delta` (B, C, H, W): the window of side `side` at
    (corner[0], corner[1]) (B,) each becomes the pattern `shape` (B, s, s) times `signs` (B, C, 1, 1) plus the mass it
    held, rescaled per channel to hold its own and the second window's mass (at corner[2], corner[3]) and a share of
    what the whole lacks of `epsilon`; the second window loses its mass. Only the two windows are read and written;
    the union's mass is the first's plus what the second holds outside the first."""
    channels = delta.shape[1]
    whole = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    rows = torch.arange(len(delta), device=delta.device)
    field = windows(delta, side)
    first = field[rows, :, corner[0], corner[1]]                                    # (B, C, s, s)
    in_first = first.square().sum(dim=(2, 3), keepdim=True)                         # squared, (B, C, 1, 1)
    field[rows, :, corner[0], corner[1]] = 0
    in_both = in_first + field[rows, :, corner[2], corner[3]].square().sum(dim=(2, 3), keepdim=True)
    field[rows, :, corner[2], corner[3]] = 0
    moved = shape.unsqueeze(1) * signs + first / (in_first.sqrt() + 1e-12)
    moved = moved / (moved.square().sum(dim=(2, 3), keepdim=True).sqrt() + 1e-12)
    field[rows, :, corner[0], corner[1]] = moved * ((epsilon ** 2 - whole ** 2).clamp_min(0) / channels + in_both).sqrt()
    return delta


class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020, "Square Attack: a query-efficient black-box adversarial attack via
    random search"), score-based: it reads the model's output scores and never a gradient. In L-infinity (below; L2:
    run_l2) it starts from
    vertical stripes of +-epsilon (one sign per channel and column), then each query sets a random square window to
    +-epsilon (one sign per channel, the first in a random order that changes the image) and keeps it when the loss
    drops: the margin of the true class over the strongest other (untargeted) or the cross-entropy to the target
    (targeted), as in the paper. The window covers a share `square_fraction` of the pixels, from `p_init` (default
    0.8, the reference implementation's and torchattacks') down, on the reference's schedule rescaled to `queries`.
    Every image is on whole levels at every query, so its budget is floor(epsilon) levels.
    Distance: L-infinity or L2 (`norm`). Arguments: queries >= 1 (the budget per image, the first query included; default: `steps`),
    p_init in (0, 1], plus the shared ones (alpha and random_start unused). `steps_used` reports the queries used.
    Each image draws its stripes, windows and signs from its own generator, seeded from `seed`, the restart and the
    image's id (its position in the run, see `Attack.__call__`): windows differ between the images of a batch, and an
    image's result does not depend on which other images share its batch."""
    name = "square"
    norms = ("Linf", "L2")
    gradient_free = True

    def __init__(self, model, queries=None, p_init=0.8, **kwargs):
        super().__init__(model, **kwargs)
        self.queries = int(queries) if queries is not None else self.steps
        self.p_init = float(p_init)

    def loss(self, logits, labels, adversarial, original):
        if self.targeted:
            return F.cross_entropy(logits, labels, reduction="none")
        return margin(logits, labels)

    @torch.no_grad()
    def run(self, original, labels, restart, ids):
        if self.norm == "L2":
            return self.run_l2(original, labels, restart, ids)
        self.original = original
        channels, height, width = original.shape[1:]
        device = original.device
        budget = float(int(self.levels))
        original_levels = (original * 255).round()
        # the two values a pixel can take in a window: original + budget and original - budget, clipped to [0, 255]
        up, down = original_levels.add(budget).clamp_(max=255), original_levels.sub(budget).clamp_(min=0)
        combos = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=channels)), device=device)
        draws = SquareDraws(self.seed, restart, ids, channels, len(combos))
        best = original_levels.add(budget * draws.stripes(width).to(device)).clamp_(0, 255)
        loss, success, logits = self.judge(best / 255, labels)
        used = torch.ones(len(original), dtype=torch.long, device=device)
        active = ~success if self.early_stop else torch.ones_like(success)
        for query in range(1, self.queries if budget > 0 else 1):
            if self.on_step:
                self.on_step(query - 1, loss, logits)
            side = square_side(self.p_init, query - 1, self.queries, height, width)
            top, left, order = (drawn.to(device) for drawn in draws.window(query - 1))
            todo = active.nonzero().view(-1)
            if len(todo) == 0:
                break
            if len(todo) == len(best):
                todo = slice(None)  # a view instead of gathered copies: most queries, without early stop all
            # every corner that keeps the window inside the image, 0..height - side, equally likely
            top = (top[todo] * (height - side + 1)).long()
            left = (left[todo] * (width - side + 1)).long()
            candidate = self.square_step(best[todo], up[todo], down[todo], top, left, side, combos, order[todo])
            self.accept((best, loss, success, logits), todo, (candidate,), self.judge(candidate / 255, labels[todo]))
            used[todo] += 1
            if self.early_stop:
                active &= ~success
        return AttackResult(best / 255, success, used, logits.argmax(dim=-1))

    @staticmethod
    def square_step(best, up, down, top, left, side, combos, order):
        """`best` with each image's side x side window at (`top`, `left`) (B,) set to up or down per channel: the
        first sign pattern in the image's `order` (indices into `combos`, (patterns, C) of +-1) that changes the image
        (the first one if none can). Only the windows are read and written: a view of every window of the batch,
        indexed at each image's corner, so a small window costs little whatever the image's size."""
        rows = torch.arange(len(best), device=best.device)
        current, raised, lowered = (windows(levels, side)[rows, :, top, left] for levels in (best, up, down))
        # per image and channel, whether each sign changes any pixel of the window; a pattern changes the image when
        # one of its channels does
        changes_up = (raised != current).flatten(2).any(dim=2)  # (B, C)
        changes_down = (lowered != current).flatten(2).any(dim=2)
        changes = torch.where(combos > 0, changes_up.unsqueeze(1), changes_down.unsqueeze(1)).any(dim=2)  # (B, P)
        first = changes.gather(1, order).int().argmax(dim=1, keepdim=True)
        signs = combos[order.gather(1, first).view(-1)].view(len(best), -1, 1, 1)  # (B, C, 1, 1)
        candidate = best.clone()
        windows(candidate, side)[rows, :, top, left] = torch.where(signs > 0, raised, lowered)
        return candidate

    # ---- L2 ---------------------------------------------------------------------------------------------------

    @staticmethod
    def accept(state, todo, candidates, judged):
        """Keep each candidate of `todo` (indices, or a slice for every image) whose loss is lower, never away from
        success, or that reaches the goal: `state` is (images..., loss, success, logits), updated in place in the
        rows kept, `candidates` the new images (one per image of the state) and `judged` their (loss, success,
        logits). "Lower" means by more than float noise: a window the model does not feel gives the same loss up to
        the last bits, and those bits depend on the batch's size, so a strict < would make an image's path depend on
        its batch."""
        new_loss, new_success, new_logits = judged
        *images, loss, success, logits = state
        lower = new_loss < loss[todo] - SQUARE_TOLERANCE * loss[todo].abs().clamp_min(1)
        keep = ((lower & (new_success | ~success[todo])) | (new_success & ~success[todo])).nonzero().view(-1)
        rows = keep if isinstance(todo, slice) else todo[keep]  # a few images per query: copy those rows only
        for image, candidate in zip(images, candidates):
            image[rows] = candidate[keep]
        loss[rows], success[rows], logits[rows] = new_loss[keep], new_success[keep], new_logits[keep]

    def to_ball(self, original, original_levels, delta):
        """original + delta scaled to L2 norm epsilon, clipped to [0, 1] (the reference's step), and its 8-bit image
        inside the ball (lattice_within)."""
        scale = self.eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        image = torch.addcmul(original, delta, scale.view(-1, 1, 1, 1)).clamp_(0, 1)
        return image, lattice_within(original_levels, image - original, "L2", self.levels).div_(255)

    def run_l2(self, original, labels, restart, ids):
        """Square in L2 (Andriushchenko et al. 2020, section 3.2): the start is a grid of tiles of side H // 5, each
        the window pattern (square_pattern) with a random sign per channel, scaled to L2 norm epsilon; each query
        moves the perturbation's mass from a second random window into the first, redrawn as the pattern plus what
        it held, keeping the whole at norm epsilon, and keeps it when the loss drops. The window's side follows
        the Linf schedule (at least 3, odd). Draws per image (SquareDraws), judged on the 8-bit image inside the
        ball."""
        self.original = original
        batch, channels, height, width = original.shape
        device = original.device
        draws = SquareDraws(self.seed, restart, ids, channels, 0)
        tile = max(height // 5, 1)
        offset_h, offset_w = (height - tile * (height // tile)) // 2, (width - tile * (width // tile)) // 2
        corners = [(offset_h + i * tile, offset_w + j * tile) for i in range(height // tile) for j in range(width // tile)]
        tiles = draws.tiles(len(corners)).to(device)
        pattern = square_pattern(tile).to(device)
        delta = torch.zeros_like(original)
        for k, (top, left) in enumerate(corners):
            shape = torch.where(tiles[:, k, 0].view(-1, 1, 1) > 0.5, pattern.t(), pattern)  # (B, s, s)
            signs = torch.where(tiles[:, k, 1:] > 0.5, 1.0, -1.0).float().view(batch, channels, 1, 1)
            delta[:, :, top:top + tile, left:left + tile] += shape.unsqueeze(1) * signs
        original_levels = (original * 255).round()
        best, lattice = self.to_ball(original, original_levels, delta)
        loss, success, logits = self.judge(lattice, labels)
        state = (best, lattice, loss, success, logits)
        used = torch.ones(batch, dtype=torch.long, device=device)
        active = ~success if self.early_stop else torch.ones_like(success)
        features = channels * height * width
        for query in range(1, self.queries if self.eps > 0 else 1):
            if self.on_step:
                self.on_step(query - 1, loss, logits)
            todo = active.nonzero().view(-1)
            if len(todo) == 0:
                break
            if len(todo) == batch:
                todo = slice(None)  # views instead of gathered copies
            side = max(round(math.sqrt(square_fraction(self.p_init, query - 1, self.queries) * features / channels)),
                       3)
            side = min(side + 1 - side % 2, height, width)
            drawn = draws.uniforms(query - 1, 5 + channels).to(device)[todo]
            corner = [(drawn[:, k] * (size - side + 1)).long() for k, size in
                      zip(range(4), (height, width, height, width))]
            shape = square_pattern(side).to(device)
            shape = torch.where(drawn[:, 4].view(-1, 1, 1) > 0.5, shape.t(), shape.expand(len(drawn), side, side))
            signs = torch.where(drawn[:, 5:] > 0.5, 1.0, -1.0).float().view(-1, channels, 1, 1)
            delta = move_mass(best[todo] - original[todo], shape, signs, corner, side, self.eps)
            candidate, levels = self.to_ball(original[todo], original_levels[todo], delta)
            self.accept(state, todo, (candidate, levels), self.judge(levels, labels[todo]))
            used[todo] += 1
            if self.early_stop:
                active &= ~success
        return AttackResult(lattice, success, used, logits.argmax(dim=-1))
