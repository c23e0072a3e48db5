"""The shape of the code: rooms that point one way, no import cycle, small modules, no path hacks.

The layers are import-linter's contract in pyproject.toml (also run by `make lint`); imports inside
functions count. The contract is checked on the real import graph, and on the same graph with an
upward import or a cycle added, which must break it.
"""

from __future__ import annotations

import ast

import grimp
import pytest
import tomllib

from tests import ROOT

PACKAGE = ROOT / "uptrain_gqa"


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def layers() -> list[list[str]]:
    (contract,) = [c for c in contracts() if c["type"] == "layers"]
    return [[m.strip() for m in layer.split("|")] for layer in contract["layers"]]


def upward_imports(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    """Chains by which a lower layer reaches a higher one (imports inside functions included)."""
    levels = layers()
    found = []
    for i, higher in enumerate(levels):
        for lower in [m for layer in levels[i + 1 :] for m in layer]:
            for upper in higher:
                chain = graph.find_shortest_chain(importer=lower, imported=upper, as_packages=True)
                if chain:
                    found.append(chain)
    for layer in levels:  # modules of one layer are independent of each other
        for a in layer:
            for b in layer:
                if a != b and graph.find_shortest_chain(importer=a, imported=b, as_packages=True):
                    found.append((a, b))
    return found


def cycles(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    """Every direct import a -> b that b leads back from, as the chain b -> ... -> a."""
    found = []
    for importer in sorted(graph.modules):
        if not importer.startswith("uptrain_gqa"):
            continue
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                found.append((importer, *back))
    return found


def build() -> grimp.ImportGraph:
    return grimp.build_graph("uptrain_gqa", cache_dir=None)


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return build()


def test_import_linter_contracts_are_kept() -> None:
    from importlinter.application.use_cases import lint_imports
    from importlinter.configuration import configure

    configure()
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True), "see `make lint`"


def test_every_room_is_in_a_layer(graph) -> None:
    rooms = {m for m in graph.find_children("uptrain_gqa")}
    placed = {m for layer in layers() for m in layer}
    assert rooms == placed, f"not in the layers contract: {sorted(rooms - placed)}; gone: {sorted(placed - rooms)}"


def test_imports_point_down_and_never_cycle(graph) -> None:
    assert upward_imports(graph) == []
    assert cycles(graph) == []


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    upward = build()
    upward.add_import(importer="uptrain_gqa.io.reader", imported="uptrain_gqa.conversion.steps")  # I/O -> a stage
    assert ("uptrain_gqa.io.reader", "uptrain_gqa.conversion.steps") in upward_imports(upward)
    sideways = build()
    sideways.add_import(importer="uptrain_gqa.serving", imported="uptrain_gqa.training.budget")  # stage -> stage
    assert ("uptrain_gqa.serving", "uptrain_gqa.training") in upward_imports(sideways)
    cyclic = build()
    cyclic.add_import(importer="uptrain_gqa.conversion.steps", imported="uptrain_gqa.conversion.layouts")
    assert any(c[0] == "uptrain_gqa.conversion.steps" for c in cycles(cyclic))


def test_no_module_over_600_lines() -> None:
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 600} == {}


def test_no_sys_path_edits_in_scripts_or_tests() -> None:
    offenders = []
    for folder in ("scripts", "benchmarks", "experiments", "tests", "uptrain_gqa"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                target = node.func if isinstance(node, ast.Call) else None
                if isinstance(target, ast.Attribute) and ast.unparse(target.value) == "sys.path":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_layout_page_is_current() -> None:
    from scripts.layout import layout_markdown, readme_section

    assert readme_section((ROOT / "docs" / "development.md").read_text()) == layout_markdown(), (
        "run `python -m scripts.layout --write`"
    )


def keyword_parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The parameters a caller may pass by name (self and cls aside)."""
    names = [a.arg for a in (*function.args.args, *function.args.kwonlyargs)]
    return [n for n in names if n not in ("self", "cls")]


def wide_functions(tree: ast.AST, limit: int = 10) -> list[str]:
    return [
        f"{node.name} ({len(keyword_parameters(node))})"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and len(keyword_parameters(node)) > limit
    ]


def test_no_function_takes_more_than_ten_keyword_parameters() -> None:
    """Eleven knobs in one signature means an options object is missing (the options dataclasses hold fields)."""
    wide = {p.relative_to(ROOT).as_posix(): wide_functions(ast.parse(p.read_text())) for p in PACKAGE.rglob("*.py")}
    assert {p: names for p, names in wide.items() if names} == {}
    eleven = ", ".join(f"a{i}" for i in range(11))
    assert wide_functions(ast.parse(f"def f({eleven}): pass")) == ["f (11)"]
    assert wide_functions(ast.parse(f"class C:\n    def m(self, {eleven[4:]}): pass")) == []


def test_the_training_loop_never_branches_on_the_parallel_strategy() -> None:
    """One parallelism object per strategy decides (training/parallel.py: Replicated, FullyShard): the loop, the
    checkpointer and the run ask it, and never test whether the model is sharded."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            is_test = isinstance(node, ast.Compare) and any(isinstance(op, ast.Is | ast.IsNot) for op in node.ops)
            if is_test and "sharding" in ast.unparse(node.left) and ast.unparse(node.comparators[0]) == "None":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []
