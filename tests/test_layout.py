"""The package's layout is its map (docs/design.md): at most 12 entries at the top of dare_pipeline/,
each package importing only what its line of the map allows, no import cycle between modules, and
`import dare_pipeline` never loading the training code."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "dare_pipeline"
NOT_ENTRIES = {"__init__.py", "py.typed", "__pycache__"}
FACES = {"api.py"}  # modules allowed at the top: the package's face

# entry -> the entries its modules may import (any import, module level or inside a function);
# "__init__" is the package's own __init__.py (its public names)
ALLOWED = {
    "__init__": {"api", "config", "core", "models"},
    "core": set(),
    "config": {"core"},
    "execution": {"config"},
    "models": {"core", "execution"},
    "reuse": {"core"},
    "prompts": {"config", "models"},
    "api": {"config", "core", "execution", "models", "prompts"},
    "evaluation": {"api", "config", "core", "execution", "models", "prompts", "reuse"},
    "serving": {"api", "config", "core", "models", "prompts"},
    "plugin_kit": {"api", "config", "core", "models"},
    "cli": {"__init__", "api", "config", "core", "evaluation", "execution", "models", "plugin_kit", "prompts",
            "serving"},
    "training": {"config", "evaluation", "models"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def entry(module: str) -> str:
    """The top-level entry a module belongs to ("__init__" for the package itself)."""
    parts = module.split(".")
    return parts[1].removesuffix(".py") if len(parts) > 1 else "__init__"


def is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str, module_level_only: bool):
    """The dare_pipeline modules `module` imports: `from pkg import sub` counts as importing pkg.sub."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def walk(nodes, top):
        for node in nodes:
            if is_type_checking(node):
                continue
            if isinstance(node, ast.Import):
                yield from (a.name for a in node.names if a.name.split(".")[0] == "dare_pipeline")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != "dare_pipeline":
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    yield sub if sub in MODULES else source
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and top:
                if not module_level_only:
                    yield from walk(ast.iter_child_nodes(node), False)
            else:
                yield from walk(ast.iter_child_nodes(node), top)

    yield from walk(ast.parse(path.read_text()).body, True)


def test_the_top_level_holds_at_most_twelve_entries_each_on_the_map():
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name not in NOT_ENTRIES)
    assert len(entries) <= 12, entries
    for name in entries:
        path = PACKAGE / name
        assert (path / "__init__.py").is_file() or name in FACES, f"{name}: neither a package nor a face module"
    assert {n.removesuffix(".py") for n in entries} == set(ALLOWED) - {"__init__"}


def test_each_package_imports_only_what_the_map_allows():
    wrong = []
    for module in sorted(MODULES):
        for target in imports(module, module_level_only=False):
            if entry(target) != entry(module) and entry(target) not in ALLOWED[entry(module)]:
                wrong.append(f"{module} imports {target} ({entry(module)} may import: "
                             f"{', '.join(sorted(ALLOWED[entry(module)])) or 'nothing'})")
    assert wrong == []


def test_the_map_has_a_layer_order():
    placed, left = [], dict(ALLOWED)
    while left:
        ready = [name for name, needs in left.items() if needs <= set(placed)]
        assert ready, f"the map has a cycle among {sorted(left)}"
        placed += ready
        for name in ready:
            del left[name]


def test_no_module_level_import_cycle():
    def ancestors(module):
        parts = module.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    graph = {}
    for module in MODULES:
        targets = set()
        for target in imports(module, module_level_only=True):
            # importing a submodule first runs the packages above it that are not already importing
            targets |= {target} | (ancestors(target) - ancestors(module) - {module})
        graph[module] = {t for t in targets if t in MODULES and t != module}

    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_import_dare_pipeline_does_not_load_training():
    code = "import sys, dare_pipeline; print(sorted(m for m in sys.modules if m.startswith('dare_pipeline.training')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_map_in_design_md_is_this_table():
    text = (ROOT / "docs" / "design.md").read_text()
    assert text.startswith("# Design\n\n## The map"), "docs/design.md opens with the map"
    section = text.split("## The map", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = {}
    for row in rows:
        name, _owns, may_import = (cell.strip() for cell in row.strip("|").split("|"))
        name = name.strip("`").removesuffix("/").removesuffix(".py")
        documented[name] = set() if may_import == "nothing" else {
            n.strip().strip("`").removesuffix("/").removesuffix(".py") for n in may_import.split(",")}
    assert documented == ALLOWED
