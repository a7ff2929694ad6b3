"""Command-line plumbing: one-line errors with exit status 2, and argument types that check their ranges."""
import argparse
import os
import sys

from utils.errors import UsageError  # noqa: F401 (re-exported: `from utils.cli import UsageError` is the usual spelling)


def speaks_for_all():
    """Whether this process reports errors: under torchrun every process meets the same bad input, and one line from
    rank 0 says it once; a plain run is rank 0."""
    return os.environ.get("RANK", "0") == "0"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line ("prog: error: ...") instead of usage text plus the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n" if speaks_for_all() else None)


def run(main, parser, argv=None):
    """Parse argv and call main(args); a UsageError becomes one line on stderr, the parameters it names written as
    the flags that set them (flag_of), and exit status 2. The process keeps the memory it frees for reuse
    (utils.speed.keep_freed_memory)."""
    from utils import speed  # here, not at the top: speed imports torch, which whatever imports this module for its
    # errors alone (utils.files, and through it tools.create_idx_to_label) need not load. speed imports only utils.errors
    args = parser.parse_args(argv)
    speed.keep_freed_memory()
    try:
        status = main(args)
    except UsageError as error:
        if speaks_for_all():
            print(f"{parser.prog}: error: {error.describe(flag_of(parser))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)


def flag_of(parser):
    """How a command line names a library parameter in an error (UsageError.describe): as the flag of `parser` that
    sets it, read from the parser so that no table of names is kept twice ("norm" -> "--norm", "input_size" ->
    "--input-size"); a parameter no flag sets, or a name given already as a flag, stays as written."""
    def spell(parameter):
        for action in parser._actions:
            longs = [option for option in action.option_strings if option.startswith("--")]
            if action.dest == parameter and longs:
                return longs[0]
        return parameter
    return spell


def number_in(low, high, kind=float, low_open=False, name="value"):
    """An argparse type: a number of `kind` in [low, high] (or (low, high] with low_open)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value != value or value > high or value < low or (low_open and value == low):
            left = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"{name} must be in {left}{low}, {high}], got {text}")
        return value

    parse.__name__ = name
    return parse


def comma_list(kind=str, name="value"):
    """An argparse type: a comma-separated list, each item parsed by `kind`."""

    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{name} list is empty")
        return [kind(item) for item in items]

    parse.__name__ = name
    return parse


def one_of(choices, what):
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose from {', '.join(choices)}")
        return text
    parse.__name__ = what
    return parse


def listed(kind, name, ascending=False):
    """A comma-separated list of `kind` (see utils.cli.comma_list) without repeats, sorted when `ascending`."""
    parse = comma_list(kind, name)

    def distinct_items(text):
        items = list(dict.fromkeys(parse(text)))
        return sorted(items) if ascending else items
    distinct_items.__name__ = name
    return distinct_items


def print_loss_every(period, classes):
    """An attack's on_step that prints the tutorial's "Loss: ... / Class: ..." line every `period` steps, the class
    named among `classes`."""
    def on_step(step, loss, logits):
        if step % period == 0:
            print(f"Loss: {loss.mean().item():.2f} / Class: {classes[int(logits.argmax(dim=1)[0])]}", flush=True)
    return on_step
