"""docs/exercises: every solution passes each of its exercise's tests, every untouched stub fails
each of them (with NotImplementedError or an AssertionError, never by passing), and stub, solution
and test files come in threes with one docstring and one set of public signatures per exercise."""

import ast
import functools
import importlib.util
from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parents[1] / "docs" / "exercises"
STUBS = sorted(p.stem for p in FOLDER.glob("ex[0-9][0-9]_*.py"))
SOLUTIONS = sorted(p.stem for p in (FOLDER / "solutions").glob("ex[0-9][0-9]_*.py"))
TESTED = sorted(p.stem.removeprefix("test_") for p in FOLDER.glob("test_ex[0-9][0-9]_*.py"))


def exercise_tests(exercise: str) -> list[str]:
    """The test functions of an exercise's test file, read from its source (nothing is imported to collect)."""
    tree = ast.parse((FOLDER / f"test_{exercise}.py").read_text())
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]


CASES = [pytest.param(exercise, name, id=f"{exercise}::{name}")
         for exercise in TESTED for name in exercise_tests(exercise)]


@functools.lru_cache(maxsize=None)
def load(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def conftest():
    """docs/exercises/conftest.py: the exercises' own loader and thread setting."""
    return load(FOLDER / "conftest.py", "minilora_exercises_conftest")


def exercise_module(exercise: str, which: str):
    """The stub ("stub") or the solution ("solutions"), through the exercises' own conftest loader."""
    return conftest().load_exercise(exercise, which)


def exercise_test(exercise: str, name: str):
    return getattr(load(FOLDER / f"test_{exercise}.py", f"minilora_exercises_test_{exercise}"), name)


def test_every_exercise_has_a_stub_a_solution_and_tests():
    assert STUBS, f"no exercises found in {FOLDER}"
    assert STUBS == SOLUTIONS == TESTED
    assert all(exercise_tests(exercise) for exercise in STUBS)
    readme = (FOLDER / "README.md").read_text()
    assert all(f"`{exercise}`" in readme for exercise in STUBS), "every exercise has a row in docs/exercises/README.md"


def public_signatures(path: Path) -> tuple[str, dict[str, str]]:
    """(module docstring, {public name: its signature(s)}) of a module, from its source."""
    tree = ast.parse(path.read_text())

    def signature(node) -> str:
        returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
        return f"({ast.unparse(node.args)}){returns}"

    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            out[node.name] = signature(node)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            methods = {m.name: signature(m) for m in node.body if isinstance(m, ast.FunctionDef)}
            out[node.name] = f"class({bases}) {methods}"
    return ast.get_docstring(tree, clean=False), out


@pytest.mark.parametrize("exercise", STUBS)
def test_stub_and_solution_share_the_task_and_the_signatures(exercise):
    stub_doc, stub = public_signatures(FOLDER / f"{exercise}.py")
    solution_doc, solution = public_signatures(FOLDER / "solutions" / f"{exercise}.py")
    assert stub_doc and stub_doc == solution_doc
    assert stub and stub == solution
    assert "raise NotImplementedError(" in (FOLDER / f"{exercise}.py").read_text()


def defined_names(path: Path) -> set[str]:
    """Names a module's top level defines itself (functions, classes, assignments), imports left out."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


@pytest.mark.parametrize("exercise", STUBS)
def test_the_tests_define_no_name_of_the_code(exercise):
    """The notebooks (docs/notebooks.py) run an exercise's code and its tests in one namespace: a helper
    of the tests named like a function of the code would replace the student's."""
    code = defined_names(FOLDER / f"{exercise}.py") | defined_names(FOLDER / "solutions" / f"{exercise}.py")
    assert not code & defined_names(FOLDER / f"test_{exercise}.py")


@pytest.mark.parametrize("exercise", TESTED)
def test_each_test_takes_only_the_module_and_says_what_it_checks(exercise):
    tree = ast.parse((FOLDER / f"test_{exercise}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            args = node.args
            assert [a.arg for a in args.posonlyargs + args.args] == ["ex"], node.name
            assert not (args.vararg or args.kwarg or args.kwonlyargs or node.decorator_list), node.name
            assert ast.get_docstring(node), f"{node.name} has no docstring"


@pytest.mark.parametrize("exercise, name", CASES)
def test_the_solution_passes(exercise, name):
    with conftest().one_thread():
        exercise_test(exercise, name)(exercise_module(exercise, "solutions"))


@pytest.mark.parametrize("exercise, name", CASES)
def test_the_untouched_stub_fails(exercise, name):
    with conftest().one_thread(), pytest.raises((NotImplementedError, AssertionError)):
        exercise_test(exercise, name)(exercise_module(exercise, "stub"))
