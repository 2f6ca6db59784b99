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
