"""No import circles: the module-level imports between vdeploy's own modules form a DAG (README, "Architecture").
Imports inside functions (how the CLI loads a stage only in its command) are not module-level and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the source folders and the package each installs as (pyproject's package-dir)
PACKAGES = {"vdeploy": ROOT / "vdeploy", "vdeploy.export": ROOT / "export", "vdeploy.runtime": ROOT / "runtime"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The vdeploy modules ``name`` imports at module level (its top-level statements, not inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If):  # `if __name__ == "__main__":` and TYPE_CHECKING blocks run no import cycle
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_module_level_imports_have_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # a package's __init__ importing its own submodules is the usual layout, not a circle: leave those edges out
    graph = {n: {m for m in deps if not (m.startswith(n + ".") and modules[n].name == "__init__.py")}
             for n, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert {"vdeploy.runtime.steps", "vdeploy.runtime.samplers", "vdeploy.cli_options"} <= set(graph)
