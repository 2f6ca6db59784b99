"""The shape of the package: no module reaches into another's private names, and the data flow
config → roles → surgery → lora → io/combine → model has no arrow pointing back."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "minilora").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
# The core's order: a module may import only modules before it (or outside this list).
FLOW = ["config", "state_names", "roles", "mixing", "adapter_layer", "lora", "targets", "surgery", "adapter_files", "combine", "model"]


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def package_modules(tree: ast.Module) -> dict[str, str]:
    """Local names bound to modules of the package (`from . import mixing`, `import minilora.io as io`)."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("minilora")):
            for alias in node.names:
                bound[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("minilora"):
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name
    return bound


def private_reaches(source: str) -> list[str]:
    """Each place where `source` imports or reads a private name of a package module."""
    tree = ast.parse(source)
    found = []
    modules = package_modules(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("minilora")):
            found += [f"imports {alias.name} from {node.module or '.'}" for alias in node.names if private(alias.name)]
        if isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name) \
                and node.value.id in modules:
            found.append(f"reads {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_a_private_name_of_another():
    assert len(SOURCES) > 20
    found = [f"{path.relative_to(ROOT)}: {item}" for path in SOURCES for item in private_reaches(path.read_text())]
    assert found == []


def test_the_check_catches_a_private_import():
    sample = "from .model import _helper, LoraModel\nfrom . import mixing\nmixing._current.get()\nmixing.apply\n"
    assert private_reaches(sample) == ["imports _helper from model", "reads mixing._current"]


def test_the_core_imports_only_what_comes_before_it():
    for i, name in enumerate(FLOW):
        tree = ast.parse((ROOT / "minilora" / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module} if node.module else {a.name for a in node.names}
        later = sorted(imported & set(FLOW[i + 1:]))
        assert later == [], f"minilora/{name}.py imports {later}, which come after it in {FLOW}"


LAYER_FILES = {"adapter_layer.py", "lora.py", "embedding.py", "experts.py", "conv.py", "trainable_tokens.py"}


def kind_checks(source: str, kinds: set[str]) -> list[str]:
    """The isinstance calls in `source` that name one of `kinds`: code asking which kind a layer is."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            found += [f"line {node.lineno}: {name}" for name in sorted(names & kinds)]
    return found


def test_no_module_outside_the_layer_files_asks_a_layer_kind():
    """LoraModel, io.py and surgery.py call the AdapterLayer contract; only the layer files name kinds."""
    kinds = {"LoraLinear", "LoraEmbedding", "LoraExperts", "LoraConv", "TrainableTokens"}
    found = [f"{path.relative_to(ROOT)} {item}" for path in SOURCES if path.name not in LAYER_FILES
             for item in kind_checks(path.read_text(), kinds)]
    assert found == []
    assert kind_checks("isinstance(m, (nn.Linear, LoraConv))", kinds) == ["line 1: LoraConv"]
