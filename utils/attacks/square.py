"""Square Attack: score-based random search."""
import hashlib
import itertools
import math

import torch
import torch.nn.functional as F

from utils.attacks.base import Attack, AttackResult, margin


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

    def window(self, query):
        """Iteration `query`'s draws, (B,) each: (row, column) of the window's corner as fractions in [0, 1) of the
        free range, and (B, signs) the order in which each image tries the sign patterns."""
        if not self.start <= query < self.stop:
            uniforms = [torch.rand(self.BLOCK, 2 + self.signs, dtype=torch.float64, generator=generator)
                        for generator in self.generators]
            self.block = torch.stack(uniforms)
            self.start, self.stop = query, query + self.BLOCK
        drawn = self.block[:, query - self.start]
        return drawn[:, 0], drawn[:, 1], drawn[:, 2:].argsort(dim=1)


SQUARE_TOLERANCE = 1e-5


class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020, "Square Attack: a query-efficient black-box adversarial attack via
    random search"), L-infinity, score-based: it reads the model's output scores and never a gradient. It starts from
    vertical stripes of +-epsilon (one sign per channel and column), then each query sets a random square window to
    +-epsilon (one sign per channel, the first in a random order that changes the image) and keeps it when the loss
    drops: the margin of the true class over the strongest other (untargeted) or the cross-entropy to the target
    (targeted), as in the paper. The window covers a share `square_fraction` of the pixels, from `p_init` (default
    0.8, the reference implementation's and torchattacks') down, on the reference's schedule rescaled to `queries`.
    Every image is on whole levels at every query, so its budget is floor(epsilon) levels.
    Distance: L-infinity. Arguments: queries >= 1 (the budget per image, the first query included; default: `steps`),
    p_init in (0, 1], plus the shared ones (alpha and random_start unused). `steps_used` reports the queries used.
    Each image draws its stripes, windows and signs from its own generator, seeded from `seed`, the restart and the
    image's id (its position in the run, see `Attack.__call__`): windows differ between the images of a batch, and an
    image's result does not depend on which other images share its batch."""
    name = "square"
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
            new_loss, new_success, new_logits = self.judge(candidate / 255, labels[todo])
            # a lower loss moves on, but never away from success; reaching the goal is always kept. "Lower" means by
            # more than float noise: a window the model does not feel gives the same loss up to the last bits, and
            # those bits depend on the batch's size, so a strict < would make an image's path depend on its batch
            lower = new_loss < loss[todo] - SQUARE_TOLERANCE * loss[todo].abs().clamp_min(1)
            accept = (lower & (new_success | ~success[todo])) | (new_success & ~success[todo])
            best[todo] = torch.where(accept.view(-1, 1, 1, 1), candidate, best[todo])
            loss[todo] = torch.where(accept, new_loss, loss[todo])
            logits[todo] = torch.where(accept.view(-1, 1), new_logits, logits[todo])
            success[todo] = torch.where(accept, new_success, success[todo])
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

        def windows(levels):  # (B, C, s, s): each image's window, a gather from the view (B, C, corners, corners, s, s)
            return levels.unfold(2, side, 1).unfold(3, side, 1)[rows, :, top, left]
        current, raised, lowered = windows(best), windows(up), windows(down)
        # per image and channel, whether each sign changes any pixel of the window; a pattern changes the image when
        # one of its channels does
        changes_up = (raised != current).flatten(2).any(dim=2)  # (B, C)
        changes_down = (lowered != current).flatten(2).any(dim=2)
        changes = torch.where(combos > 0, changes_up.unsqueeze(1), changes_down.unsqueeze(1)).any(dim=2)  # (B, P)
        first = changes.gather(1, order).int().argmax(dim=1, keepdim=True)
        signs = combos[order.gather(1, first).view(-1)].view(len(best), -1, 1, 1)  # (B, C, 1, 1)
        candidate = best.clone()
        candidate.unfold(2, side, 1).unfold(3, side, 1)[rows, :, top, left] = torch.where(signs > 0, raised, lowered)
        return candidate
