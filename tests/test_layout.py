"""The layout's arrows, read from the imports: each chapter is a leaf. A step script, app.py and demo.py import utils/
and step 2 (the tutorial's helper module), and step 5 imports step 3 (its get_adversarial_example), as in the
tutorial; no other step imports a step. Nothing in utils/ imports a step, a program of tools/ or a benchmark; no code
imports tools/ or bench/ (their tests excepted); and the programs of tools/ run as `python -m tools.NAME`, with no
sys.path edits."""
import ast

from tests.conftest import REPO

STEPS = {path.stem for path in REPO.glob("step_*.py")}
PROGRAMS = {"app", "demo"}


def imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def arrows(paths, among):
    """(importing file's module or path, imported top-level name) for every import of a name in `among`."""
    return {(path.stem if path.parent == REPO else str(path.relative_to(REPO)), module)
            for path in paths for module in set(imported_modules(path)) if module in among}


def code_files(folder):
    return sorted(path for path in (REPO / folder).rglob("*.py") if "__pycache__" not in path.parts)


def test_the_chapters_import_only_step_2_and_step_5_step_3():
    programs = [REPO / f"{name}.py" for name in sorted(STEPS | PROGRAMS)]
    step_arrows = arrows(programs, STEPS)
    expected = {(name, "step_2_pretrained") for name in STEPS | PROGRAMS if name != "step_2_pretrained"}
    expected.add(("step_5_perturb", "step_3_adversarial"))
    assert step_arrows <= expected, sorted(step_arrows - expected)
    assert ("step_5_perturb", "step_3_adversarial") in step_arrows, "step 5 applies r with step 3's function"


def test_utils_imports_no_step_no_program_no_benchmark():
    climbing = arrows(code_files("utils"), STEPS | PROGRAMS | {"tools", "bench"})
    assert not climbing, sorted(climbing)


def test_no_code_imports_tools_or_bench():
    code = [REPO / f"{name}.py" for name in STEPS | PROGRAMS] + code_files("utils") + code_files("tools") + \
        code_files("bench")
    assert not arrows(code, {"tools", "bench"})


def test_the_programs_of_tools_edit_no_import_path():
    tools = code_files("tools")
    assert len(tools) >= 5
    edits = [str(path.relative_to(REPO)) for path in tools if "sys.path" in path.read_text()]
    assert not edits


def test_the_checker_sees_a_climbing_import(tmp_path):
    helper = tmp_path / "helper.py"
    helper.write_text("import os\nfrom step_7_break_defense import figure\nimport tools.make_readme\n")
    assert {"step_7_break_defense", "tools"} <= set(imported_modules(helper))


def project_imports(path):
    """The modules of utils/ that `path` imports anywhere in it (at the top or inside a function), full names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(f"{node.module}.{alias.name}" if node.module == "utils" else node.module for alias in node.names)
    return {name for name in names if name.startswith("utils.")}


def test_errors_speed_and_cli_import_one_way():
    """utils.errors imports nothing of the project's; utils.speed imports utils.errors and not utils.cli; utils.cli
    (which re-exports UsageError) may import utils.speed: the arrow goes one way, no cycle."""
    assert project_imports(REPO / "utils" / "errors.py") == set()
    speed_imports = set().union(*(project_imports(path) for path in code_files("utils/speed")))
    assert {name for name in speed_imports if not name.startswith("utils.speed.")} == {"utils.errors"}
    assert project_imports(REPO / "utils" / "cli.py") == {"utils.errors", "utils.speed"}
    from utils import cli, errors
    assert cli.UsageError is errors.UsageError
