"""The layers hold: no import cycle between files, and no package imports one above it (function-local imports
included). core/ is the bottom; serve/ and predictor_train/ sit on it and never import each other; pipeline/
(the CLI and the stages) is the top."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("core", "serve", "predictor_train", "pipeline")
MAY_IMPORT = {"core": {"core"}, "serve": {"core", "serve"}, "predictor_train": {"core", "predictor_train"},
              "pipeline": set(PACKAGES)}  # fmt: skip
KNOWN_UPWARD: set[tuple[str, str]] = set()  # none left; an exception would be listed here with its reason


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_package_imports_upwards():
    bad = [(m, t) for m, targets in _graph().items() for t in targets
           if t.split(".")[0] not in MAY_IMPORT[m.split(".")[0]] and (m, t) not in KNOWN_UPWARD]  # fmt: skip
    assert not bad, bad


def test_no_import_cycle_between_files():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
