"""The house rules of docs/architecture.md, checked on the code: no import cycle, each room imports
only what it may, no private name imported across modules, and one training loop."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "selfdistill"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """Every import of a module (function-level ones too): ``(imported module, names taken)``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def _edges() -> dict[str, set[str]]:
    """Module -> project modules it imports (``from pkg import submodule`` counts the submodule)."""
    edges: dict[str, set[str]] = {}
    for name in MODULES:
        targets = set()
        for module, names in _imports(name):
            if module not in MODULES:
                continue
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            targets.update(subs)
            if len(subs) < len(names) or not names:
                targets.add(module)
        targets.discard(name)
        edges[name] = targets
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    assert _cycles(_edges()) == []


def test_the_cycle_finder_finds_a_cycle():  # the check above can fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _under(room: str) -> list[str]:
    return [m for m in MODULES if m == room or m.startswith(room + ".")]


@pytest.mark.parametrize("room,forbidden", [
    ("selfdistill.models", ("selfdistill.engine", "selfdistill.eval", "selfdistill.methods", "selfdistill.data",
                            "selfdistill.training")),
    ("selfdistill.data", ("selfdistill.engine", "selfdistill.eval", "selfdistill.methods", "selfdistill.models",
                          "selfdistill.training")),
    ("selfdistill.losses", ("selfdistill",)),
    ("selfdistill.console", ("selfdistill",)),
    ("selfdistill.engine", ("selfdistill.methods", "selfdistill.eval", "selfdistill.recipe", "selfdistill.pretrain",
                            "selfdistill.training")),
    ("selfdistill.methods", ("selfdistill.eval", "selfdistill.cli", "selfdistill.training")),
    # the planner counts: no model, no loop, no process; the probe measures without an entry point
    ("selfdistill.planner", ("selfdistill.eval", "selfdistill.cli", "selfdistill.pretrain", "selfdistill.engine",
                             "selfdistill.methods", "selfdistill.plan_probe", "selfdistill.training")),
    ("selfdistill.strategy_memory", ("selfdistill",)),
    ("selfdistill.plan_probe", ("selfdistill.eval", "selfdistill.cli", "selfdistill.pretrain", "selfdistill.training")),
    # evaluation reads frozen weights; tasks train: no loop, no task, no optimizer in eval/
    ("selfdistill.eval", ("selfdistill.engine", "selfdistill.training", "selfdistill.methods", "selfdistill.cli",
                          "selfdistill.pretrain")),
    # the training wing: tasks of the loop that update weights (engine), scored by eval/, on models and data
    ("selfdistill.training", ("selfdistill.methods", "selfdistill.cli", "selfdistill.pretrain", "selfdistill.planner",
                              "selfdistill.demo")),
    ("selfdistill.config", ("selfdistill.engine", "selfdistill.methods")),  # the recipe checks itself, engine-free
    ("selfdistill.tracker_schema", ("selfdistill.engine",)),
    ("selfdistill.rundir", ("selfdistill",)),  # the run directory's layout sits below everything
])
def test_rooms_import_only_what_they_may(room, forbidden):
    edges = _edges()
    wrong = [(m, t) for m in _under(room) for t in edges[m]
             if t.startswith(forbidden) and not t.startswith(room)]
    assert wrong == []


def test_whatever_trains_is_a_method_or_in_the_training_wing():
    """Every task of the loop (a class deriving from ``Task``) is a pretraining method or lives in
    ``training/``: evaluation only reads weights."""
    tasks = [f"{m}.{node.name}" for m, p in MODULES.items() for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "") == "Task" for b in node.bases)]
    assert tasks and any(t.startswith("selfdistill.training.") for t in tasks)
    assert all(t.startswith(("selfdistill.methods.", "selfdistill.training.")) for t in tasks), tasks


# The shard writer's modules, lowest first: each may import only those before it; readers none of them.
SHARD_WRITER = ["selfdistill.data.shard_inputs", "selfdistill.data.shard_encode", "selfdistill.data.shard_workers",
                "selfdistill.data.shard_output", "selfdistill.data.shard_writer"]


def test_the_shard_writer_is_layered_and_readers_never_import_it():
    edges = _edges()
    writer_side = set(SHARD_WRITER) | {"selfdistill.data.shard_verify"}
    upward = [(m, t) for i, m in enumerate(SHARD_WRITER) for t in edges[m] if t in SHARD_WRITER[i + 1:]]
    verify = [t for t in edges["selfdistill.data.shard_verify"]
              if t in ("selfdistill.data.shard_output", "selfdistill.data.shard_writer")]
    readers = [(m, t) for m in _under("selfdistill.data") if m not in writer_side for t in edges[m] if t in writer_side]
    assert (upward, verify, readers) == ([], [], [])


def test_losses_import_only_torch_and_numpy():
    outside = {m.split(".")[0] for m, _ in _imports("selfdistill.losses")} - set(sys.stdlib_module_names)
    assert outside <= {"torch", "numpy"}


def test_no_private_name_is_imported_from_another_module():
    private = [(m, module, n) for m in MODULES for module, names in _imports(m) if module.startswith("selfdistill")
               for n in names if n.startswith("_") and module != m]
    assert private == []


def test_one_training_loop():
    """The batch loop lives in the engine only, and its sibling that reads frozen weights (every
    image embedded or summed once, no gradients) in ``eval/inference.py``; fine-tuning is a task of
    the loop."""
    pattern = re.compile(r"def _train_epoch|for .* in .*loader")
    hits = [f"{m}:{i}" for m, p in MODULES.items() for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert any(h.startswith("selfdistill.engine.") for h in hits), hits
    assert all(h.startswith(("selfdistill.engine.", "selfdistill.eval.inference:")) for h in hits), hits
    finetune = [m for m in _under("selfdistill.training") if m.startswith("selfdistill.training.finetune")]
    assert finetune
    for m in finetune:
        assert not re.search(r"^\s+for .* in .*(loader|batches)", MODULES[m].read_text(), re.M), m


def _backward_and_step_calls(source: str) -> list[int]:
    """Lines calling ``<expression>.backward(...)`` or ``<expression>.step(...)``: a backward pass
    (``loss.backward()``, ``accelerator.backward(loss)``) or a step of an optimizer. Any ``.step(``
    counts, whatever the receiver (a name cannot tell an optimizer from a torch LR scheduler, and
    both belong to the loop); schedules are set through ``step_update(step)``, which the loop calls."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("backward", "step")]


def test_only_the_engine_calls_backward_or_step():
    """Whatever updates weights is a task of the one loop: outside ``engine/`` no module runs a
    backward pass or steps an optimizer (read from the syntax tree, not from the text)."""
    hits = [f"{m}:{line}" for m, p in MODULES.items() if not m.startswith("selfdistill.engine.")
            for line in _backward_and_step_calls(p.read_text())]
    assert not hits, hits
    engine = _backward_and_step_calls(MODULES["selfdistill.engine.trainer"].read_text())
    assert engine, "the loop itself must be seen calling backward/step"


def test_the_backward_and_step_finder_finds_them():  # the check above can fail
    code = "for b in bar:\n    acc.backward(loss)\n    opt.step()\n    sched.step_update(3)\n    step(x)\n" \
           "    (a or b).step(closure=f)\n"
    assert _backward_and_step_calls(code) == [2, 3, 6]
