"""Generate the project's documents from their templates by running the commands they name, so every quoted output
is real: README.md (the front door: the story and the tutorial's five steps) from docs/README.in.md, each chapter
page docs/NAME.md from docs/NAME.in.md, and docs/tutorial.pt-BR.md (the tutorial's path in Portuguese) from
docs/tutorial.pt-BR.in.md.

Directives in a template (each on a line of its own):
    <!-- run: python SCRIPT ARGS -->       run it from the repository root; paste the command and what it printed
    <!-- cmd: python SCRIPT ARGS -->       run it (long: a progress bar) and show only the command
    <!-- cmd: python SCRIPT ARGS > FILE --> the same, its standard output written to FILE (for an include: below)
    <!-- include: PATH -->                 paste a file that an earlier command wrote (a table); outside a code
                                           block its headings move down to nest under the heading above the
                                           directive (a report's `# Results` under a `## ` chapter becomes `### `)
    <!-- figure: SOURCE -> docs/NAME -->   copy a figure an earlier command wrote into docs/ (committed)
    <!-- quote: COMMAND | PREFIX -->       the one line starting with PREFIX that COMMAND printed in this generation
    <!-- toc -->                           links to the template's chapters (its ## and ### headings below this line)

One generation renders its documents in order (DOCUMENTS), README.md first. Each command runs once, where it first
appears: a command that two documents (or one document twice) show is quoted with that one run's output everywhere,
and a command that reads what an earlier one wrote runs after it, in document order.

    python -m tools.make_readme [--skip-cmd]                            every document
    python -m tools.make_readme --template TEMPLATE --output OUTPUT     one document
"""
import re
import shlex
import shutil
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from utils.cli import ArgumentParser, UsageError, run
from utils.files import save_text

# README.md first, then one page per chapter, the Portuguese walkthrough last: in this order each command that reads
# a file (a model, an evaluation's folder) comes after the one that writes it.
CHAPTERS = ("tutorial-fixes", "attacks", "evaluation", "defenses", "adversarial-training", "certification", "speed",
            "own-model", "bad-input", "app", "layout")
DOCUMENTS = (("docs/README.in.md", "README.md"),
             *((f"docs/{name}.in.md", f"docs/{name}.md") for name in CHAPTERS),
             ("docs/tutorial.pt-BR.in.md", "docs/tutorial.pt-BR.md"))
DIRECTIVE = re.compile(r"<!-- (run|cmd|include|figure|quote): (.*) -->|<!-- (toc) -->")
HEADING = re.compile(r"(#{1,6}) +(.+?) *#* *$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
TOC_LEVELS = (2, 3)  # chapters and their sections
TOC = object()  # where the table of contents goes, until the document around it is rendered
PROGRESS_BAR = re.compile(r"^\s*$|\d+%\|")  # tqdm's lines on stderr: a terminal shows them, a README should not
CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's nested bars move the cursor up to redraw


def without_progress_bars(text):
    lines = CURSOR_MOVES.sub("", text).replace("\r", "\n").splitlines()
    return "\n".join(line for line in lines if not PROGRESS_BAR.search(line))


def console_block(command, printed=""):
    """A command as a reader would type it, and what it printed (nothing for a long `cmd`)."""
    return "```console\n$ " + command + "\n" + printed.rstrip("\n") + ("\n" if printed else "") + "```"


def execute(command):
    """What `command` (python ARGS, or python ARGS > FILE) prints when run from the repository root, progress bars
    left out; with `> FILE`, its standard output goes to FILE as a shell would write it."""
    args = shlex.split(command)
    target = None
    if len(args) > 2 and args[-2] == ">":
        args, target = args[:-2], REPO / args[-1]
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, *args[1:]], cwd=REPO, capture_output=True, text=True)
    print(f"[{time.perf_counter() - started:6.1f}s] exit {completed.returncode}: {command}", file=sys.stderr)
    if completed.returncode not in (0, 1, 2) or (target and completed.returncode):
        raise SystemExit(f"{command} failed:\n{completed.stderr}")
    if target:
        save_text(completed.stdout, target)
        return without_progress_bars(completed.stderr)
    return without_progress_bars(completed.stdout + completed.stderr)


def slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped (letters of any script, digits, spaces,
    hyphens and underscores stay), spaces as hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    kept = "".join(char for char in text if char in " -_" or unicodedata.category(char)[0] in "LNM")
    return kept.replace(" ", "-")


def headings(text):
    """(level, heading, anchor) of every markdown heading in `text` outside code blocks, in order; a repeated anchor
    gets -1, -2, ... as on GitHub."""
    found, seen, fenced = [], {}, False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.fullmatch(line)
        if match:
            level, title = len(match.group(1)), match.group(2)
            anchor = slug(title)
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            found.append((level, title, anchor if count == 0 else f"{anchor}-{count}"))
    return found


def nested(text, level):
    """`text` (an included file) with its headings moved down so that the highest is one level below `level`, the
    heading above the include; never moved up, none past level 6, code blocks left as they are."""
    levels = [found for found, _, _ in headings(text)]
    shift = level + 1 - min(levels, default=level + 1)
    if shift <= 0:
        return text
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and HEADING.fullmatch(line):
            depth = len(line) - len(line.lstrip("#"))
            line = "#" * min(6, depth + shift) + line[depth:]
        lines.append(line)
    return "\n".join(lines)


def table_of_contents(chapters, rendered):
    """A nested list of links to `chapters` ((level, title) of the template, in order), each to the anchor its heading
    has in the rendered document (where included files add headings of their own)."""
    remaining, lines = headings(rendered), []
    for level, title in chapters:
        index = next(i for i, (found_level, found, _) in enumerate(remaining) if (found_level, found) == (level, title))
        anchor = remaining[index][2]
        remaining = remaining[index + 1:]
        lines.append("  " * (level - TOC_LEVELS[0]) + f"- [{title}](#{anchor})")
    return "\n".join(lines)


class Generation:
    """One generation of documents: the commands it ran (by their exact text) and what each printed."""

    def __init__(self, skip_cmd=False):
        self.skip_cmd = skip_cmd
        self.printed = {}
        self.figures = set()

    def output_of(self, command):
        if command not in self.printed:
            self.printed[command] = execute(command)
        else:
            print(f"[ cached] {command}", file=sys.stderr)
        return self.printed[command]

    def quote(self, value):
        """The one line starting with PREFIX that COMMAND printed, from `COMMAND | PREFIX`."""
        command, _, prefix = (part.strip() for part in value.rpartition("|"))
        if command not in self.printed:
            raise SystemExit(f"quote: {command!r} was not run in this generation (a run directive must show it)")
        lines = [line for line in self.printed[command].splitlines() if line.startswith(prefix)]
        if len(lines) != 1:
            raise SystemExit(f"quote: {command!r} printed {len(lines)} lines starting with {prefix!r}, not one")
        return lines[0]

    def render_line(self, line, level=None):
        """The text for one template line: a string, or for a quote or the table of contents a function of the
        generation (and the rendered document), filled in once every document's commands have run. `level`: the
        level of the heading above the line, None inside a code block (where an include is pasted as it is)."""
        match = DIRECTIVE.fullmatch(line.strip())
        if not match:
            return line
        kind, value = match.group(1) or match.group(3), match.group(2)
        if kind == "run":
            return console_block(value, self.output_of(value))
        if kind == "cmd":
            if not self.skip_cmd:
                self.output_of(value)
            return console_block(value)
        if kind == "include":
            text = (REPO / value).read_text().rstrip("\n")
            return text if level is None else nested(text, level)
        if kind == "quote":
            return lambda rendered: self.quote(value)
        if kind == "toc":
            return TOC
        source, target = (part.strip() for part in value.split("->"))
        if (source, target) not in self.figures:  # a figure both documents show is copied where it is first made
            shutil.copyfile(REPO / source, REPO / target)
            self.figures.add((source, target))
        return ""

    def render(self, template):
        """The template's lines, its commands run: strings and functions of the finished document."""
        lines = (REPO / template).read_text().splitlines()
        parts, level, fenced = [], 0, False
        for line in lines:
            parts.append(self.render_line(line, None if fenced else level))
            if FENCE.match(line):
                fenced = not fenced
            elif not fenced and HEADING.fullmatch(line):
                level = len(HEADING.fullmatch(line).group(1))
        if TOC in parts:
            start = parts.index(TOC)
            chapters = [(level, title) for level, title, _ in headings("\n".join(lines[start + 1:]))
                        if level in TOC_LEVELS]
            parts[start] = lambda rendered: table_of_contents(chapters, rendered)
        return parts


def finish(parts, template):
    """The document's text, its quotes and table of contents filled in."""
    draft = "\n".join(part if isinstance(part, str) else "" for part in parts)
    body = "\n".join(part if isinstance(part, str) else part(draft) for part in parts)
    program = Path(__file__).resolve().relative_to(REPO)
    header = f"<!-- Generated by {program} from {template}: edit that, then regenerate. -->"
    return re.sub(r"\n{3,}", "\n\n", body).rstrip("\n") + "\n\n" + header + "\n"


def main(args):
    if (args.template is None) != (args.output is None):
        raise UsageError("--template and --output go together (without both, every document is generated)")
    documents = [(args.template, args.output)] if args.template else DOCUMENTS
    for template, _ in documents:
        if not (REPO / template).is_file():
            raise UsageError(f"{template}: no such template")
    generation = Generation(args.skip_cmd)
    rendered = [(template, output, generation.render(template)) for template, output in documents]
    texts = [(output, finish(parts, template)) for template, output, parts in rendered]
    for output, text in texts:  # written only once every document is complete
        save_text(text, REPO / output)


def get_args_parser():
    parser = ArgumentParser(description="Generate README.md, the chapter pages of docs/ and docs/tutorial.pt-BR.md by "
                                        "running the commands they quote.")
    parser.add_argument("--template", help="one template to render (with --output), relative to the repository")
    parser.add_argument("--output", help="where to write it, relative to the repository")
    parser.add_argument("--skip-cmd", action="store_true", help="do not rerun the long `cmd` commands (their files exist)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
