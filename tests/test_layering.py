"""The layering of DESIGN.md, read from the source with ast: models/ is pure torch, DeepSpeed lives in
pipeline/train/, MLflow in pipeline/tracking/, the config schema imports no torch, and no import cycles."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "pipeline")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}   # `from pipeline import tracking`
    return found


def sources() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def test_models_import_nothing_of_pipeline():
    bad = {m: sorted(i for i in imports(p, False) if i.split(".")[0] == "pipeline")
           for m, p in sources().items() if m.startswith("models")}
    assert not {m: i for m, i in bad.items() if i}


def test_deepspeed_only_in_train_and_mlflow_only_in_tracking():
    for module, path in sources().items():
        used = {i.split(".")[0] for i in imports(path, False)}
        if "deepspeed" in used:
            assert module.startswith("pipeline.train"), module
        if "mlflow" in used:
            assert module == "pipeline.tracking" or module.startswith("pipeline.tracking."), module


def test_config_schema_imports_no_torch_and_no_pipeline_module_but_errors():
    used = imports(REPO / "pipeline" / "config.py", False)
    assert not {i for i in used if i.split(".")[0] in ("torch", "numpy", "timm", "deepspeed", "mlflow")}
    assert {i for i in used if i.startswith("pipeline")} <= {"pipeline.errors", "pipeline.errors.UserError"}


def test_no_import_cycles():
    mods = sources()
    graph = {m: {i for i in imports(p, True) if i in mods and i != m} for m, p in mods.items()}
    # a package's __init__ importing its own submodules is how a package exports; count only edges out of it
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if m.startswith(n + "."):   # a submodule importing its parent package runs the parent first
                continue
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
