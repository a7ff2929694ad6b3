"""The generated documents (README.md, a page per chapter in docs/ and the Portuguese tutorial, docs/tutorial.pt-BR.md)
against their templates: every command block is one the generator ran, a command several show has one output in all,
the two languages run the same tutorial, the quoted story lines are those outputs' lines, every link to a heading, a
file or an image leads to one, the README stays short, each page opens with what it teaches and ends with where to go
next, and no document has a second title; then the generator itself on small templates: one run per command and
generation, in document order, nothing written when a document fails, an included report nested under its heading."""
import re
from argparse import Namespace
from pathlib import Path

import pytest

from tests.conftest import REPO
from tools import make_readme
from utils.cli import UsageError
from tools.make_readme import DIRECTIVE, DOCUMENTS, headings, nested, slug

CONSOLE = re.compile(r"^```console\n\$ (.*?)\n(.*?)^```$", re.M | re.S)
CODE = re.compile(r"^```.*?^```$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
TOC_ITEM = re.compile(r"^ *- \[(.+)\]\(#([^)]+)\)$", re.M)
README, TUTORIAL = DOCUMENTS[0], DOCUMENTS[-1]  # the front door and the Portuguese walkthrough
CHAPTERS = DOCUMENTS[1:-1]  # one page per chapter
README_LINES = 300


def read(path):
    return (REPO / path).read_text()


def directives(template):
    """(kind, value) of each directive line of a template, in order."""
    found = (DIRECTIVE.fullmatch(line.strip()) for line in read(template).splitlines())
    return [(match.group(1) or match.group(3), match.group(2)) for match in found if match]


def console_blocks(document):
    """(command, what it printed) of each command block of a document, in order."""
    return [(command, printed.rstrip("\n")) for command, printed in CONSOLE.findall(read(document))]


def run_outputs(template, document):
    """{command: output} of the commands the template runs and shows with their output."""
    kinds = [kind for kind, _ in directives(template) if kind in ("run", "cmd")]
    return {command: printed for kind, (command, printed) in zip(kinds, console_blocks(document)) if kind == "run"}


def prose(document):
    """The document without its code blocks: where headings and links are."""
    return CODE.sub("", read(document))


@pytest.mark.parametrize("template, document", DOCUMENTS)
def test_every_command_block_is_one_the_generator_ran(template, document):
    assert "```console" not in read(template), f"{template} has a command block written by hand"
    ran = [value for kind, value in directives(template) if kind in ("run", "cmd")]
    assert ran or (template, document) in CHAPTERS, f"{template} runs nothing"  # a page may be prose alone
    assert [command for command, _ in console_blocks(document)] == ran, \
        f"{document} is not what {template} generates: regenerate it with python -m {make_readme.__name__}"
    assert read(document).rstrip().endswith(f"from {template}: edit that, then regenerate. -->")


def test_a_command_several_documents_show_has_one_output_in_all():
    seen = {}
    for template, document in DOCUMENTS:
        for command, printed in run_outputs(template, document).items():
            first = seen.setdefault(command, (document, printed))
            assert printed == first[1], f"{command}: {document} and {first[0]} show different outputs"
    (tutorial_template, tutorial) = TUTORIAL
    portuguese = run_outputs(tutorial_template, tutorial)
    for command, printed in console_blocks(tutorial):
        assert printed or command not in portuguese, f"{command} printed nothing"


def test_the_two_languages_run_the_same_commands():
    """The walkthrough runs the README's tutorial, and each command it runs beyond it (steps 8, 9 and 10) is shown, with
    the same output, on an English page: a command in one language is in the other."""
    english = {value for template, _ in DOCUMENTS[:-1]
               for kind, value in directives(template) if kind in ("run", "cmd")}
    readme = [value for kind, value in directives(README[0]) if kind == "run"]
    portuguese = [value for kind, value in directives(TUTORIAL[0]) if kind in ("run", "cmd")]
    assert len(readme) >= 6, "the README should run the tutorial's steps 2, 3, 5, 6 and 7"
    assert [command for command in readme if command not in portuguese] == [], "the walkthrough skips a README step"
    assert [command for command in portuguese if command not in english] == [], "no English page runs these"
    for step in ("step_8_evaluate.py", "step_9_adversarial_training.py", "step_10_certify.py"):
        assert any(command.startswith(f"python {step} ") for command in portuguese), f"the walkthrough skips {step}"


def text_block_lines(document):
    """Lines of the document's plain-text blocks (```text), where the quoted story is shown."""
    blocks = re.findall(r"^```text\n(.*?)^```$", read(document), re.M | re.S)
    return [line for block in blocks for line in block.splitlines()]


@pytest.mark.parametrize("template, document", DOCUMENTS)
def test_each_quoted_line_is_a_line_its_command_printed_in_the_same_document(template, document):
    printed = run_outputs(template, document)
    quoted = []
    for kind, value in directives(template):
        if kind == "quote":
            command, _, prefix = (part.strip() for part in value.rpartition("|"))
            assert command in printed, f"{document} quotes {command!r}, which it does not run and show"
            [line] = [line for line in printed[command].splitlines() if line.startswith(prefix)]
            quoted.append(line)
    assert "\n".join(quoted) in "\n".join(text_block_lines(document)), \
        f"{document}: the quoted lines are not there (is it generated from the current {template}?)"


@pytest.mark.parametrize("template, document", [(template, document) for template, document in DOCUMENTS
                                                if "<!-- toc -->" in read(template).splitlines()])
def test_the_contents_link_every_chapter_to_its_heading(template, document):
    lines = read(template).splitlines()
    after_toc = "\n".join(lines[lines.index("<!-- toc -->") + 1:])
    chapters = [title for level, title, _ in headings(after_toc) if level in (2, 3)]
    titles = {anchor: title for _, title, anchor in headings(read(document))}
    toc = TOC_ITEM.findall(prose(document))
    assert [title for title, _ in toc] == chapters, f"{document}: its contents are not {template}'s chapters"
    for title, anchor in toc:
        assert titles.get(anchor) == title, f"{document}: [{title}](#{anchor}) leads to no such heading"


@pytest.mark.parametrize("template, document", DOCUMENTS)
def test_every_link_to_a_heading_or_a_file_leads_to_one(template, document):
    folder = (REPO / document).parent
    for target in LINK.findall(prose(document)):
        if re.match(r"[a-z]+:", target):  # an address on the web
            continue
        path, _, anchor = target.partition("#")
        linked = (folder / path).resolve() if path else REPO / document
        assert linked.is_file(), f"{document} links to {target}, which is not a file"
        if anchor:
            anchors = {found for _, _, found in headings(linked.read_text())}
            assert anchor in anchors, f"{document} links to {target}: {linked.name} has no such heading"


def test_each_document_links_to_the_other_at_its_top():
    (_, readme), (_, tutorial) = README, TUTORIAL
    assert "](docs/tutorial.pt-BR.md)" in "\n".join(read(readme).splitlines()[:5]), f"{readme} does not link it first"
    assert "](../README.md)" in "\n".join(read(tutorial).splitlines()[:5])
    for _, page in CHAPTERS:
        assert "[Back to the README](../README.md)" in "\n".join(read(page).splitlines()[:5]), page


def test_the_readme_is_a_front_door():
    """Short; the two commands first; the five steps with their pictures; every chapter one click away; no contents
    longer than the chapter list."""
    text = read(README[1])
    assert len(text.splitlines()) <= README_LINES, f"{README[1]} has {len(text.splitlines())} lines"
    titles = [title for level, title, _ in headings(text)]
    assert titles[1:3] == ["Start here", "The tutorial, step by step"], "the two commands, then the five steps"
    start = text.split("\n## Start here\n")[1].split("\n## ")[0]
    assert "\nmake demo " in start and "\nmake test " in start
    steps = prose(README[1]).split("## The tutorial, step by step")[1].split("\n## ")[0]
    for step in (2, 5, 3, 6, 7):
        section = steps.split(f"### Step {step}:")[1].split("\n### ")[0]
        assert re.search(r"!\[[^\]]*\]\(docs/[^)]+\.png\)", section), f"step {step} has no picture"
    linked = set(LINK.findall(prose(README[1])))
    for _, page in CHAPTERS:
        assert page in linked, f"{README[1]} does not link {page}"
    assert "<!-- toc -->" not in read(README[0]), "the chapter list is the README's only contents"


def test_every_page_in_docs_is_generated():
    pages = {str(path.relative_to(REPO)) for path in (REPO / "docs").glob("*.md") if not path.name.endswith(".in.md")}
    assert pages == {document for _, document in DOCUMENTS[1:]}


def paragraphs(document):
    """The document's paragraphs outside code blocks, without the generator's closing comment."""
    return [part.strip() for part in prose(document).split("\n\n") if part.strip() and
            not part.strip().startswith("<!--")]


@pytest.mark.parametrize("template, document", CHAPTERS + (TUTORIAL,))
def test_each_page_opens_with_what_you_will_learn_and_ends_with_where_to_go_next(template, document):
    learn, next_ = ("O que você vai aprender", "Para onde ir depois") if (template, document) == TUTORIAL else \
        ("What you will learn", "Where to go next")
    opening = [part for part in paragraphs(document)[1:] if not part.startswith(("[", "English:"))][0]
    assert opening.lstrip("*").startswith(learn), f"{document} does not open with {learn!r}: {opening[:80]!r}"
    found = headings(read(document))
    assert found[-1][:2] == (2, next_), f"{document} does not end with a {next_!r} chapter"
    last = prose(document).split(f"## {next_}\n")[-1]
    assert LINK.search(last), f"{document}: {next_!r} links nowhere"


@pytest.mark.parametrize("template, document", DOCUMENTS)
def test_no_document_has_a_second_title(template, document):
    titles = [title for level, title, _ in headings(read(document)) if level == 1]
    assert len(titles) == 1, f"{document} has top-level headings {titles}"


def test_the_page_is_linked_from_both_languages_with_its_screenshot():
    assert "](docs/app.md)" in prose(README[1]) and "](app.md)" in prose(TUTORIAL[1])
    assert "](app.png)" in prose("docs/app.md") and (REPO / "docs/app.png").is_file()


@pytest.mark.parametrize("heading, anchor", [
    ('Step 5: learn a perturbation that says "goldfish"', "step-5-learn-a-perturbation-that-says-goldfish"),
    ("What this fixes in the tutorial's code", "what-this-fixes-in-the-tutorials-code"),
    ("Offline, ResNet18 and the torch cache", "offline-resnet18-and-the-torch-cache"),
    ("Passo 2: o que o modelo vê?", "passo-2-o-que-o-modelo-vê"),
    ("Treinamento adversarial (passo 9)", "treinamento-adversarial-passo-9"),
    ("`make_readme` and **bold**", "make_readme-and-bold"),
])
def test_anchors_are_githubs(heading, anchor):
    assert slug(heading) == anchor


def test_a_repeated_heading_gets_a_numbered_anchor_and_code_is_no_heading():
    text = "# Results\n## Sanity checks\n```\n## not a heading\n```\n## Sanity checks\n"
    assert [anchor for _, _, anchor in headings(text)] == ["results", "sanity-checks", "sanity-checks-1"]


# ---- the generator on small templates --------------------------------------------------------------------------

COUNTER = ("python -c \"import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.write_text(p.read_text() + 'x' "
           "if p.exists() else 'x'); print('runs:', len(p.read_text()))\" {}")
READER = "python -c \"import pathlib, sys; print('read:', pathlib.Path(sys.argv[1]).read_text())\" {}"


def generate(tmp_path, monkeypatch, templates, **options):
    """Generate every template (name: text) into tmp_path as the default documents; {name: rendered text}."""
    documents = []
    for name, text in templates.items():
        (tmp_path / f"{name}.in.md").write_text(text)
        documents.append((str(tmp_path / f"{name}.in.md"), str(tmp_path / f"{name}.md")))
    monkeypatch.setattr(make_readme, "DOCUMENTS", tuple(documents))
    make_readme.main(Namespace(template=None, output=None, skip_cmd=False, **options))
    return {name: (tmp_path / f"{name}.md").read_text() for name in templates}


def test_a_command_in_two_documents_runs_once_and_both_show_that_run(tmp_path, monkeypatch):
    counter = COUNTER.format(tmp_path / "count")
    docs = generate(tmp_path, monkeypatch, {"first": f"# A\n\n<!-- run: {counter} -->\n",
                                            "second": f"# B\n\n<!-- run: {counter} -->\n<!-- run: {counter} -->\n"})
    assert (tmp_path / "count").read_text() == "x"
    assert docs["first"].count("runs: 1") == 1 and docs["second"].count("runs: 1") == 2


def test_commands_run_in_document_order_and_quotes_and_contents_are_filled_in(tmp_path, monkeypatch):
    note = tmp_path / "note.txt"
    writer = f"python -c \"import pathlib; pathlib.Path('{note}').write_text('made'); print('Made: one note')\""
    docs = generate(tmp_path, monkeypatch, {
        "first": f"# A\n\n```text\n<!-- quote: {writer} | Made: -->\n```\n\n<!-- toc -->\n\n## One\n\n"
                 f"<!-- run: {writer} -->\n\n### Detail\n\n## Two\n",
        "second": f"# B\n\n<!-- run: {READER.format(note)} -->\n"})
    assert "```text\nMade: one note\n```" in docs["first"]
    assert "- [One](#one)\n  - [Detail](#detail)\n- [Two](#two)" in docs["first"]
    assert "read: made" in docs["second"]


def test_an_included_report_nests_under_the_heading_it_is_included_at(tmp_path, monkeypatch):
    (tmp_path / "summary.md").write_text("# Results\n\ntext\n\n## Checks\n\n```\n# a comment\n```\n")
    (tmp_path / "table.txt").write_text("# a header line\nrow\n")
    report, table = (f"<!-- include: {tmp_path / name} -->" for name in ("summary.md", "table.txt"))
    page = f"# Page\n\n## Chapter\n\n{report}\n\n## Next\n\n```text\n{table}\n```\n"
    docs = generate(tmp_path, monkeypatch, {"page": page})
    assert [(level, title) for level, title, _ in headings(docs["page"])] == [
        (1, "Page"), (2, "Chapter"), (3, "Results"), (4, "Checks"), (2, "Next")]
    assert "```\n# a comment\n```" in docs["page"]  # code in the report is not a heading
    assert "```text\n# a header line\nrow\n```" in docs["page"]  # pasted into a code block as it is


def test_nesting_moves_headings_down_never_up_and_never_past_six():
    assert nested("## A\n#### B", 1) == "## A\n#### B"  # already below a level-1 heading
    assert nested("# A\n## B", 3) == "#### A\n##### B"
    assert nested("# A\n###### B", 2) == "### A\n###### B"
    assert nested("no heading", 2) == "no heading"


def test_a_failing_document_writes_no_document(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="was not run in this generation"):
        generate(tmp_path, monkeypatch, {"good": "# fine\n", "bad": "<!-- quote: python -c pass | x -->\n"})
    assert not (tmp_path / "good.md").exists() and not (tmp_path / "bad.md").exists()


def test_one_document_by_template_and_output(tmp_path):
    (tmp_path / "one.in.md").write_text("# One\n\n<!-- run: python -c \"print('hello')\" -->\n")
    make_readme.main(Namespace(template=str(tmp_path / "one.in.md"), output=str(tmp_path / "one.md"), skip_cmd=False))
    assert "```console\n$ python -c \"print('hello')\"\nhello\n```" in (tmp_path / "one.md").read_text()
    with pytest.raises(UsageError, match="go together"):
        make_readme.main(Namespace(template=str(tmp_path / "one.in.md"), output=None, skip_cmd=False))
    with pytest.raises(UsageError, match="no such template"):
        make_readme.main(Namespace(template=str(tmp_path / "none.in.md"), output=str(tmp_path / "x.md"),
                                   skip_cmd=False))
