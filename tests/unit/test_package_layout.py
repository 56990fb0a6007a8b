"""The package's layers: every import points down (or sideways within a layer), and no
two modules import each other, directly or in a circle (function-level imports count:
they are deferred, not absent)."""

from __future__ import annotations

import ast
from pathlib import Path

import vllm_kvcdn

ROOT = Path(vllm_kvcdn.__file__).parent
LAYERS = [  # lowest first: a module may import from its own layer and the ones before it
    {"__init__", "log", "defaults"},
    {"store"},  # bytes under keys: file://, s3://, tiers
    {"artifact"},  # what a published document is: keys, fingerprint, format, manifests, index
    {"market"},  # metering and prices (plain SQLite and arithmetic)
    {"config", "hf"},  # the connector's settings; the transformers path
    {"compat", "connector"},  # the vLLM connector and its view of vLLM
    {"api", "plugin"},  # the side API; vLLM's plugin entry points
    {"testing"},  # rigs for tests, benchmarks and the demo
    {"cli"},  # the kvcdn command
]


def _modules() -> dict[str, set[str]]:
    """Module name (relative to the package) -> the package's modules it imports."""
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vllm_kvcdn"):
                base = node.module.removeprefix("vllm_kvcdn").lstrip(".")
                for alias in node.names:  # "from vllm_kvcdn.artifact import catalog" imports a module
                    sub = f"{base}.{alias.name}" if base else alias.name
                    deps.add(sub if (ROOT / f"{sub.replace('.', '/')}.py").exists() else base or "__init__")
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("vllm_kvcdn.") for a in node.names if a.name.startswith("vllm_kvcdn.")}
        out[name] = deps - {name}
    return out


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {module} is in no layer: add its folder to LAYERS")


def test_every_import_points_down():
    wrong = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
             for m, deps in _modules().items() for d in deps if _layer(d) > _layer(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    graph = _modules()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                circle = path[path.index(dep):] + [dep] if dep in path else [module, dep]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_connector_facade_does_not_load_the_worker_half_in_the_scheduler_process():
    """The worker half (torch work) is imported when the worker role is built, not at
    module level of the facade."""
    tree = ast.parse((ROOT / "connector" / "connector.py").read_text())
    top_level = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert "vllm_kvcdn.connector.worker" not in top_level
