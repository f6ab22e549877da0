"""The library's shape (issue 27): imports (function-level ones included) form no cycle and only go down the layers,
no library module is over 300 lines, and no code outside the methods' package picks a method by comparing its
name (callers ask the registry)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "refconv_train"

# Lowest first: a module may import its own layer or lower ones, never a higher one.
LAYERS = [
    ("errors", "config_types", "state_dicts"),
    ("methods",),  # the registry and every method
    ("config_schema", "config"),
    ("checkpoint", "data", "demo_data", "distributed", "preemption", "faults", "verify", "engine", "run_log"),
    ("models",),
    ("run",),  # factories, restore, fusing: rebuilding and fusing above checkpoint I/O
    ("trainer", "analysis", "study"),
    ("cli",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every library module ``name`` imports, wherever the import statement is (top level or inside a function)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text())
    # `if TYPE_CHECKING:` imports never run: annotations only (they may name a module that imports this one)
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                   for child in node.body for n in ast.walk(child)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import refconv_train.x.y` of an attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> int | None:
    first = name.split(".")[1] if "." in name else ""
    return next((i for i, group in enumerate(LAYERS) if first in group), None)


def test_every_library_module_has_a_layer():
    assert [n for n in modules() if n != "refconv_train" and layer(n) is None] == []


def test_library_imports_form_no_cycle():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert cycles == []


def test_imports_only_go_down_the_layers():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if a != "refconv_train" and b != "refconv_train" and layer(b) > layer(a)]
    assert upward == []


def test_no_library_module_is_over_300_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: lines for n, lines in long.items() if lines > 300} == {}


def comparisons(names: str) -> list[re.Pattern]:
    name = rf"""["'](?:{names})["']"""
    return [
        re.compile(rf"(?:==|!=)\s*{name}"),  # method == "acb"
        re.compile(rf"{name}\s*(?:==|!=)"),  # "acb" == method
        re.compile(rf"\bin\s*[\(\[\{{]\s*{name}"),  # method in ("acb", ...)
        re.compile(rf"\{{\s*{name}\s*:\s*[\"'\w]"),  # {"refconv": "refocus"}[method]: a table keyed by method names
    ]


# "none" is also an amp mode and a step norm: it counts where the line is about the method.
COMPARISONS = comparisons("refconv|refocus|acb|repvgg|dbb|orepa|wn|cwn|own")
NONE = comparisons("none")
ABOUT_METHOD = re.compile(r"method|reparam|refocus")


def compares_a_method_name(line: str) -> bool:
    return any(rx.search(line) for rx in COMPARISONS) or (
        bool(ABOUT_METHOD.search(line)) and any(rx.search(line) for rx in NONE))


def test_no_method_is_chosen_by_comparing_its_name_outside_the_methods_package():
    files = [p for p in PACKAGE.rglob("*.py") if "methods" not in p.relative_to(PACKAGE).parts[:1]]
    files += sorted((ROOT / "scripts").glob("*.py")) + sorted((ROOT / "examples").glob("*.py"))
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if not line.lstrip().startswith("#") and compares_a_method_name(line)]
    assert hits == []


def test_the_comparison_check_would_catch_the_old_dispatch():
    old = ['if method == "acb":', 'elif cfg.reparam.method != "none":', 'if m in ("acb", "repvgg"):',
           'kind = {"refconv": "refocus", "none": "baseline"}.get(method)']
    assert all(compares_a_method_name(line) for line in old)
    assert not any(compares_a_method_name(line) for line in ['if args.amp == "none":', "f\"{'refocus':>15s}\""])


def test_function_level_imports_count(tmp_path):
    pkg = tmp_path / "refconv_train"
    pkg.mkdir()
    (pkg / "checkpoint.py").write_text("def read():\n    from .run.restore import x\n    return x\n")
    found = imports("refconv_train.checkpoint", pkg / "checkpoint.py", {"refconv_train.checkpoint",
                                                                         "refconv_train.run.restore"})
    assert found == {"refconv_train.run.restore"}  # the circle issue 27 broke: checkpoint -> restore


def test_tests_scripts_and_examples_import_modules_that_exist():
    # An editable install of another checkout can serve a module this one no longer has: check by file, not by import.
    known = set(modules())
    stale = []
    for path in [*ROOT.joinpath("tests").glob("*.py"), *ROOT.joinpath("scripts").glob("*.py"),
                 *ROOT.joinpath("examples").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            stale += [f"{path.name}: {n}" for n in names if n.startswith("refconv_train") and n not in known]
    assert stale == []
