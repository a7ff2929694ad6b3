"""Is our Square as strong as the reference implementations at the same query budget?

    python bench/square_crosscheck.py [--queries 300,1000] [--seeds 5] [--epsilon 2] [--model efficientnet_lite0]
                                      [--device auto|cpu|cuda] [--threads 1] [--output FILE]

On the sample photos (utils/samples.py), untargeted against each photo's clean prediction, L-infinity epsilon in
levels out of 255, for each budget and each seed 0..seeds-1, three Square attacks on the same photos:
- ours (utils/attacks/square.py, its defaults: p_init 0.8, windows drawn per image, early stop);
- torchattacks.Square (p_init 0.8, margin loss, n_queries = the budget, seed);
- the reference, pyautoattack's SquareAttack (Croce and Hein's AutoAttack code, its Square alone, not the full
  AutoAttack; p_init 0.8, margin loss, n_queries = the budget, seed).
Both peers count n_queries as iterations after their first query (the stripes), so they get one query more than ours:
the comparison leans their way. Every result is judged the same way, on its 8-bit image: the returned image rounded to
whole levels and classified; a photo is fooled when that class is not its clean one. The table gives, per budget and
seed, how many photos each fooled, and per budget the totals over the seeds; ours should fool at least as many in total
as each peer. tests/test_crosscheck_square.py asserts it at 300 queries.
"""
import builtins
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from step_2_pretrained import OFFLINE_MODEL, get_device, load_model, predict, prepare_image, to_tensor  # noqa: E402
from utils.attacks import make_attack  # noqa: E402
from utils.cli import ArgumentParser, comma_list, number_in, run  # noqa: E402
from utils.files import save_text  # noqa: E402
from utils.flags import add_device_argument  # noqa: E402
from utils.samples import sample_paths  # noqa: E402

P_INIT = 0.8  # the reference's and torchattacks' default, and ours
IMPLEMENTATIONS = ("ours", "torchattacks", "reference")


def sample_photos(model, device="cpu"):
    """The sample photos, resized and cropped for `model`, as a float batch on whole levels."""
    return to_tensor([prepare_image(path, model) for path in sample_paths()], device)


def clean_classes(model, photos):
    return predict(model, photos).argmax(dim=1)


def judge_8bit(model, images):
    """Top-1 classes of the 8-bit versions of a float batch (what a PNG of it would be classified as)."""
    return predict(model, images.detach().mul(255).round().clamp(0, 255).div(255)).argmax(dim=1)


def ours(model, photos, labels, epsilon, queries, seed):
    attack = make_attack("square", model, epsilon=epsilon, queries=queries, targeted=False, seed=seed)
    return attack(photos, labels).adversarial


def torchattacks_square(model, photos, labels, epsilon, queries, seed):
    import torchattacks
    attack = torchattacks.Square(model, norm="Linf", eps=epsilon / 255, n_queries=queries, n_restarts=1,
                                 p_init=P_INIT, loss="margin", resc_schedule=True, seed=seed)
    return attack(photos, labels)


def reference_square(model, photos, labels, epsilon, queries, seed):
    from pyautoattack.square import SquareAttack
    attack = SquareAttack(model, norm="Linf", n_queries=queries, eps=epsilon / 255, p_init=P_INIT, n_restarts=1,
                          seed=seed, loss="margin", resc_schedule=True, device=photos.device)
    with torch.no_grad():
        return attack.perturb(photos, labels)


ATTACKS = dict(zip(IMPLEMENTATIONS, (ours, torchattacks_square, reference_square)))


def fooled(model, photos, labels, epsilon, queries, seed):
    """{implementation: (photos,) bool, fooled on its 8-bit image} for one budget and seed, on the same photos.
    Each image is also checked against the budget after rounding, so that no implementation wins by overstepping."""
    result = {}
    for name, attack in ATTACKS.items():
        adversarial = attack(model, photos, labels, epsilon, queries, seed).detach()
        levels = adversarial.mul(255).round() - photos.mul(255).round()
        if levels.abs().max() > int(epsilon):
            raise AssertionError(f"{name}: {levels.abs().max():.0f} levels over an epsilon of {epsilon}")
        result[name] = judge_8bit(model, adversarial) != labels
    return result


def crosscheck(model, photos, epsilon, queries, seeds, on_run=None):
    """[(seed, {implementation: fooled})] for seeds 0..seeds-1 at one budget."""
    labels = clean_classes(model, photos)
    rows = []
    for seed in range(seeds):
        rows.append((seed, fooled(model, photos, labels, epsilon, queries, seed)))
        if on_run:
            on_run()
    return rows


def totals(rows):
    """{implementation: photos fooled, summed over the seeds}."""
    return {name: sum(int(result[name].sum()) for _, result in rows) for name in IMPLEMENTATIONS}


def print_table(model_name, count, epsilon, tables, output=None):
    """Print the table, and with `output` also write it there (the README includes that file in a code block)."""
    lines = []

    def print(text):  # noqa: A001  (every line goes to stdout and to `output`)
        lines.append(text)
        builtins.print(text)
    print(f"Square, untargeted against the clean prediction, epsilon {epsilon:g} levels, {model_name}, {count} sample "
          f"photos, p_init {P_INIT}: photos fooled (judged on the 8-bit image) per seed")
    header = f"{'queries':>7} {'seed':>5} " + " ".join(f"{name:>12}" for name in IMPLEMENTATIONS)
    print(header)
    print("-" * len(header))
    for queries, rows in tables:
        for seed, result in rows:
            print(f"{queries:>7} {seed:>5} " + " ".join(f"{f'{int(result[n].sum())}/{count}':>12}"
                                                        for n in IMPLEMENTATIONS))
        total = totals(rows)
        print(f"{queries:>7} {'total':>5} " + " ".join(f"{f'{total[n]}/{count * len(rows)}':>12}"
                                                      for n in IMPLEMENTATIONS))
    for queries, rows in tables:
        total = totals(rows)
        verdict = "meets" if all(total["ours"] >= total[peer] for peer in IMPLEMENTATIONS[1:]) else "misses"
        print(f"{queries} queries: ours {total['ours']}, torchattacks {total['torchattacks']}, reference "
              f"{total['reference']} of {count * len(rows)} ({verdict} ours >= each peer)")
    if output:
        save_text("```\n" + "\n".join(lines) + "\n```\n", Path(output))


def main(args):
    torch.set_num_threads(args.threads)
    device = get_device(args.device)
    model = load_model(args.model, device)
    photos = sample_photos(model, device)
    from tqdm import tqdm
    tables = []
    with tqdm(total=len(args.queries) * args.seeds, desc="square cross-check", unit="seed", file=sys.stderr,
              leave=False) as progress:
        for queries in args.queries:
            tables.append((queries, crosscheck(model, photos, args.epsilon, queries, args.seeds,
                                               on_run=lambda: progress.update(1))))
    print_table(args.model, len(photos), args.epsilon, tables, args.output)


def get_args_parser():
    parser = ArgumentParser(description="Our Square against torchattacks' and the reference's on the sample photos.")
    parser.add_argument("--queries", type=comma_list(number_in(1, 10 ** 5, int, name="--queries"), name="budget"),
                        default=[300, 1000], help="query budgets per photo (default: 300,1000)")
    parser.add_argument("--seeds", type=number_in(1, 100, int, name="--seeds"), default=5,
                        help="seeds 0..N-1 per budget (default: %(default)s)")
    parser.add_argument("--epsilon", type=number_in(0, 255, low_open=True, name="--epsilon"), default=2,
                        help="L-infinity budget in levels out of 255 (default: %(default)s)")
    parser.add_argument("--model", default=OFFLINE_MODEL, help="the classifier (default: %(default)s)")
    add_device_argument(parser)
    parser.add_argument("--threads", type=number_in(1, 1024, int, name="--threads"), default=1,
                        help="torch threads on a CPU (default: %(default)s)")
    parser.add_argument("--output", help="also write the table to this file, as a Markdown code block")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
