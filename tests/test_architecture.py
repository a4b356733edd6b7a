"""The code's shape, checked: thin jobs, short functions, no import cycles, one lake layout, lean loading.

Each rule is one a newcomer relies on to find things where their names say (README, "Architecture").
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lib.data import layout
from lib.settings import PROJECT_ROOT

PACKAGES = ("lib", "jobs", "serve", "dash_app")
MAX_FUNCTION_LINES = 60
MAX_JOB_LINES = 150
# Jobs that orchestrate other jobs; every other job calls lib only.
ORCHESTRATING_JOBS = {"pipeline", "watch", "demo", "classify"}
LAKE_PREFIXES = (layout.ARCHIVE, layout.BATCHES, layout.IMAGES, layout.EMBEDDINGS, layout.PIPELINE,
                 layout.PREDICTIONS, layout.MONITORING, layout.CLASSIFIED)  # fmt: skip


def sources() -> dict[str, ast.Module]:
    """Module name → parsed source, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[module] = _parse(path.read_text(), str(path))
    return out


def _parse(source: str, filename: str) -> ast.Module:
    try:
        return ast.parse(source, filename)
    except SystemError:  # CPython < 3.11.8, gh-106905: a spurious "AST constructor recursion depth
        return ast.parse(source, filename)  # mismatch" when other threads run; a second parse succeeds


def module_imports(tree: ast.Module, module: str) -> set[str]:
    """Project modules imported at module level (lazy, function-level imports cannot form a cycle)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


def test_no_function_is_longer_than_the_limit():
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, tree in sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_jobs_are_thin_and_call_lib_not_each_other():
    for path in sorted((PROJECT_ROOT / "jobs").glob("*.py")):
        assert len(path.read_text().splitlines()) <= MAX_JOB_LINES, path.name
        if path.stem in ORCHESTRATING_JOBS:
            continue
        imported = module_imports(ast.parse(path.read_text()), f"jobs.{path.stem}")
        other_jobs = {m for m in imported if m.startswith("jobs.") and not m.startswith("jobs.common")}
        assert not other_jobs, f"{path.name} imports {other_jobs}"


def test_no_import_cycles():
    trees = sources()
    graph = {m: {i for i in module_imports(t, m) if i in trees and i != m} for m, t in trees.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in graph[module]:
            if state.get(target) == "open":
                pytest.fail(f"import cycle: {' → '.join([*path, module, target])}")
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_only_the_layout_module_spells_a_lake_prefix():
    offenders = []
    for module, tree in sources().items():
        if module in ("lib.data.layout", "lib.data.rakuten"):  # rakuten: the challenge ZIP's own folders
            continue
        for node in ast.walk(tree):
            spelled = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if spelled and any(node.value.startswith(prefix) for prefix in LAKE_PREFIXES):
                offenders.append(f"{module}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def explained(lines: list[str], index: int) -> bool:
    """An import line with a comment, or in a block of imports that one comment line introduces."""
    while True:
        if "#" in lines[index]:
            return True
        above = lines[index - 1].strip()
        if above.startswith("#"):
            return True
        if not above.startswith(("import ", "from ")) and above:
            return False
        index -= 1


def test_a_function_level_import_says_why():
    silent = []
    for path in sorted(p for package in PACKAGES for p in (PROJECT_ROOT / package).rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom) and not explained(lines, inner.lineno - 1):
                    silent.append(f"{path.relative_to(PROJECT_ROOT)}:{inner.lineno}")
    assert not silent, silent


def test_loading_a_model_imports_no_ingest_or_training_code():
    probe = (
        "import sys, lib.model.artifact, lib.model.registry, lib.model.network;"
        "bad = [m for m in ('lib.data.ingest', 'lib.model.train', 'lib.model.tune', 'lib.model.dataset',"
        " 'lib.features.embed', 'ray') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_package_map_in_the_readme_names_every_lib_module():
    readme = (PROJECT_ROOT / "README.md").read_text()
    modules = [p for p in (PROJECT_ROOT / "lib").rglob("*.py") if p.name != "__init__.py"]
    missing = [str(p.relative_to(PROJECT_ROOT)) for p in modules if p.stem not in readme]
    assert not missing, missing


def test_lib_never_imports_the_entry_points():
    for module, tree in sources().items():
        if module.startswith("lib"):
            bad = {m for m in module_imports(tree, module) if not m.startswith("lib")}
            assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("path", ["lib/data", "lib/features", "lib/model", "lib/ops"])
def test_each_lib_package_says_what_it_holds(path):
    assert ast.get_docstring(ast.parse((Path(PROJECT_ROOT) / path / "__init__.py").read_text()))


def test_the_readme_fault_matrix_lists_exactly_the_fault_tests():
    tests = {
        node.name
        for path in (PROJECT_ROOT / "tests").rglob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_fault_")
    }
    section = (PROJECT_ROOT / "README.md").read_text().split("### Fault matrix", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `(test_fault_\w+)`", section, flags=re.MULTILINE))
    assert tests and rows == tests
