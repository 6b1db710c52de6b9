"""The package's structure, read from its source with ast: no import circle among its modules,
package modules imported at module level (only optional third-party dependencies inside
functions), and the README's Layout naming every module."""
from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "fastlmm_ext"
#: What may be imported inside a function: optional dependencies that not every install has.
OPTIONAL = {"dask", "distributed", "matplotlib", "pyarrow", "tqdm", "polars"}


def modules() -> dict[str, pathlib.Path]:
    """Package module name → its source: the .py files and the Cython sources of the compiled ones."""
    out = {p.stem: p for p in PKG.glob("*.py")}
    out.update({p.stem: p for p in (ROOT / "src_c").glob("*.pyx")})
    return out


def _target(node: ast.ImportFrom | ast.Import, names: set[str]) -> list[str]:
    """The package modules an import statement imports ("__init__" for the package itself)."""
    out = []
    if isinstance(node, ast.Import):
        for a in node.names:
            parts = a.name.split(".")
            if parts[0] == "fastlmm_ext":
                out.append(parts[1] if len(parts) > 1 else "__init__")
        return out
    if node.level == 0 and not (node.module or "").startswith("fastlmm_ext"):
        return out
    if node.level > 1:
        raise AssertionError(f"import beyond the package: {ast.dump(node)}")
    mod = (node.module or "").removeprefix("fastlmm_ext").lstrip(".") if node.level == 0 else (node.module or "")
    if mod:
        out.append(mod.split(".")[0])
    else:   # from . import x: a module, or a name of the package's __init__
        out += [a.name if a.name in names else "__init__" for a in node.names]
    return out


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module → the package modules it imports, [(module, line, what) of imports inside functions])."""
    mods = modules()
    names = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    inner = []
    for name, path in mods.items():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".pyx":   # Cython: its import and cimport lines name package modules
            for lineno, line in enumerate(text.splitlines(), 1):
                m = re.match(r"\s*(?:from\s+fastlmm_ext\.(\w+)\s+c?import|c?import\s+fastlmm_ext\.(\w+))", line)
                if m:
                    graph[name].add(m.group(1) or m.group(2))
                if re.match(r"\s+(from\s+\S+\s+import|import)\s", line):     # a Python import inside a def
                    inner.append((name, lineno, line.strip()))
            continue

        def visit(node, depth):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    targets = _target(child, names)
                    graph[name].update(targets)
                    if depth:
                        top = {a.name.split(".")[0] for a in child.names} if isinstance(child, ast.Import) \
                            else {(child.module or "").split(".")[0]}
                        if targets or getattr(child, "level", 0) or not top <= OPTIONAL:
                            inner.append((name, child.lineno, ast.unparse(child)))
                visit(child, depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
        visit(ast.parse(text), 0)
    return graph, inner


def test_no_import_circle():
    graph, _ = import_graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def dfs(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            assert n in graph, f"{m} imports {n}, which is not a package module"
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                dfs(n)
        path.pop()
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_package_modules_imported_at_module_level():
    _, inner = import_graph()
    assert not inner, "imports inside functions (only optional dependencies may be): " + \
        "; ".join(f"{m}:{line} {what}" for m, line, what in inner)


def test_the_graph_is_read():
    """The reader sees the edges the package has (so the two tests above test something)."""
    graph, _ = import_graph()
    assert {"_kernel", "_selinv", "_blocked", "_pls"} <= graph["_backends"]
    assert "_kernel" in graph["_selinv"] and "_exceptions" in graph["_kernel"]
    assert "_model" in graph["_api"] and "_model" not in graph["_chunked"] | graph["_results"]
    assert "__init__" in graph["_cli"]


def test_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 4)] if "\n## " in layout[4:] else layout
    named = set(re.findall(r"\b(_[a-z][a-z_]*|plots|datasets)\b", layout))
    have = {m for m in modules() if m not in ("__init__", "__main__")}
    assert have <= named, f"modules missing from the README's Layout: {sorted(have - named)}"
    assert {n for n in named if n.startswith("_") and not n.startswith("__")} <= have | {"_kernel.pxd"}, \
        f"the Layout names modules that do not exist: {sorted(n for n in named - have if n.startswith('_'))}"
