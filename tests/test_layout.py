"""The package layout keeps its rules: imports run one way, and the Lambda zip ships no dev code.

Read from the source (ast), every import counts, at module level or inside a function, and
type-only ones too: a dependency is a dependency. The layers, bottom up:

- core: the modules directly in pipeline/ (interfaces, stages, envelope, drain, ...);
- pipeline/vendor_api/: the vendor API's client, which the core's drain and kickoff use;
- pipeline/aws/ and pipeline/local/: the two backends, each on the core, neither on the other;
- pipeline/dev/: what people at a terminal use (CLI, display, simulator), on anything above;
- workers/: the Lambda entry points, which nothing imports.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts import package

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("aws", "local", "vendor_api", "dev")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(*packages: str) -> dict[str, Path]:
    """Every module of `packages` (recursively), by dotted name."""
    found = {}
    for package_dir in packages:
        for path in sorted((ROOT / package_dir).rglob("*.py")):
            found[module_name(path)] = path
    return found


def layer(module: str) -> str:
    """core, aws, local, vendor_api or dev for a pipeline module; else its top package."""
    parts = module.split(".")
    if parts[0] != "pipeline":
        return parts[0]
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "core"


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, *, run_time_only: bool = False) -> Iterator[str]:
    """The modules `path` imports; `from a import b` names a.b where a.b is a module of ours.
    With `run_time_only`, not those under `if TYPE_CHECKING:` (they never run)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    if run_time_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _type_checking(node):
                skipped.update(id(n) for child in node.body for n in ast.walk(child))
    ours = modules("pipeline", "workers")
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                yield submodule if submodule in ours else node.module


PIPELINE = modules("pipeline")
EDGES = {name: {m for m in imports(path) if m in PIPELINE} for name, path in PIPELINE.items()}


def test_every_pipeline_module_is_in_a_layer() -> None:
    assert {layer(m) for m in PIPELINE} == {"core", *LAYERS}


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("core", {"aws", "local", "dev"}),
        ("vendor_api", {"aws", "local", "dev"}),
        ("aws", {"local", "dev"}),
        ("local", {"aws", "dev"}),
    ],
)
def test_a_layer_imports_no_layer_above_or_beside_it(importer: str, forbidden: set[str]) -> None:
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in EDGES.items()
        if layer(source) == importer
        for target in targets
        if layer(target) in forbidden
    )
    assert wrong == []


def test_nothing_in_the_library_imports_an_entry_point_or_a_tool() -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, path in PIPELINE.items()
        for target in imports(path)
        if target.split(".")[0] in ("workers", "bench", "scripts", "tests")
    )
    assert wrong == []


def test_the_pipeline_takes_its_stages_from_its_profile_not_the_default_ones() -> None:
    # pipeline.stages names the default profile's stages, for tests and examples: code
    # that ran with it would ignore the profile it was given.
    wrong = sorted(
        f"{name} imports pipeline.stages"
        for name, path in {**PIPELINE, **modules("workers")}.items()
        if name != "pipeline.stages" and "pipeline.stages" in set(imports(path))
    )
    assert wrong == []


def test_handlers_import_nothing_of_the_terminal_tools() -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, path in modules("workers").items()
        for target in imports(path)
        if target.startswith("pipeline.dev")
    )
    assert wrong == []


def test_pipeline_modules_import_each_other_without_a_cycle() -> None:
    # GIVEN the import graph; WHEN it is walked depth first; THEN no module is met again
    # while its own imports are being walked
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(EDGES[module]):
            if state.get(target) == "open":
                cycles.append([*trail[trail.index(target) :], module, target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(EDGES):
        if module not in state:
            visit(module, [module])
    assert cycles == []


# -- the Lambda zip ----------------------------------------------------------------------------


def shipped() -> dict[str, Path]:
    """The project modules scripts/package.py puts in the zip, by dotted name."""
    return {
        module_name(ROOT / name): path
        for name, path in package.project_files(ROOT)
        if path.suffix == ".py"
    }


def test_zip_ships_the_listed_packages_and_no_terminal_tool() -> None:
    names = shipped()
    # GIVEN the explicit list; THEN every module of those packages, and only those, ships
    assert set(names) == {
        m for m in modules("pipeline", "workers") if not m.startswith("pipeline.dev")
    }
    assert not [m for m in names if m.startswith("pipeline.dev")]


def test_zip_modules_need_only_what_the_zip_vendors_or_the_runtime_ships() -> None:
    # What the zip vendors: pyproject's runtime dependencies; what Lambda's Python ships:
    # the standard library and boto3 with its own dependencies.
    vendored = {
        package.requirement_name(r).replace("-", "_") for r in package.runtime_requirements()
    }
    allowed = vendored | package.RUNTIME_TOP_LEVEL | set(sys.stdlib_module_names)
    names = shipped()
    needed = sorted(
        f"{name} imports {target}"
        for name, path in names.items()
        for target in imports(path, run_time_only=True)
        if target not in names and target.split(".")[0] not in allowed | {"__future__"}
    )
    # `rich` (the CLI's display) or the simulator would show up here; the analytics extra
    # (pyarrow) only inside the compaction's functions, which no handler calls
    assert [n for n in needed if not n.startswith("pipeline.compact imports pyarrow")] == []


def test_compaction_imports_pyarrow_only_inside_its_functions() -> None:
    # The drains and the kickoff import pipeline.compact's package; pyarrow is not in the zip
    tree = ast.parse((ROOT / "pipeline" / "compact.py").read_text())
    module_level = {
        alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)
    }
    assert "pyarrow" not in module_level
    assert "duckdb" not in module_level
