"""The house rules, measured by tools/house.py: no import circle in the package, the training
library never imports the experiments, and no file over 450 lines."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("house", ROOT / "tools" / "house.py")
house = importlib.util.module_from_spec(spec)
spec.loader.exec_module(house)


def test_the_package_has_no_import_circle():
    assert house.circles(house.graph()) == []


def test_the_training_library_never_imports_the_experiments():
    edges = house.graph()
    assert "minilora.experiments.synthetic" in house.reachable(edges, "minilora.experiments")
    assert house.report()["experiments imported by minilora.train"] == []


def test_no_file_is_over_450_lines():
    assert house.report()["files over the limit"] == []


def test_the_measures_catch_what_they_measure():
    assert house.circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert house.reachable({"x.y": {"z"}, "z": set()}, "x") == {"x.y", "z"}
    known = {"minilora", "minilora.lora", "minilora.named_init"}
    source = ROOT / "minilora" / "named_init.py"
    assert "minilora.lora" not in house.imports_of("minilora.named_init", source, known)  # named_init no longer imports lora


def test_no_package_name_is_both_a_submodule_and_something_else():
    """`import minilora.pruning as m` must give the module: a function of the package with a
    submodule's name (minilora.prune was both) shadows it, or is shadowed by it once imported."""
    import pkgutil
    import types

    import minilora

    packages = [name for name in house.modules() if importlib.import_module(name).__dict__.get("__path__")]
    assert {"minilora", "minilora.train", "minilora.quant", "minilora.kernels"} <= set(packages)
    clashes = []
    for name in packages:
        package = importlib.import_module(name)
        for info in pkgutil.iter_modules(package.__path__):
            held = package.__dict__.get(info.name)
            if held is not None and not isinstance(held, types.ModuleType):
                clashes.append(f"{name}.{info.name}")
    assert clashes == [] and callable(minilora.prune) and callable(minilora.export)
