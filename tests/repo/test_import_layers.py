"""The import layers of docs/architecture.md hold, and no two modules import each other in a cycle.

import-linter checks the layers contract in ``.importlinter`` (each package imports only from the
packages below it, and every package directly under megafusion/ has a layer); the cycle check
walks grimp's module graph (every import, function-level ones included) for strongly connected
components. Each check is shown able to fail.
"""

from __future__ import annotations

import subprocess
import sys

import grimp

from tests.helpers import ROOT

CONTRACT = ROOT / ".importlinter"


def lint(config) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", code, "--config", str(config), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_no_package_imports_from_a_layer_above_it():
    proc = lint(CONTRACT)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


def broken(tmp_path, old: str, new: str) -> subprocess.CompletedProcess:
    """``lint`` of the contract with ``old`` replaced by ``new``."""
    text = CONTRACT.read_text()
    assert old in text
    contract = tmp_path / "broken.ini"
    contract.write_text(text.replace(old, new))
    return lint(contract)


def test_the_layer_check_can_fail(tmp_path):
    """core below config is the contract; core above config is broken (config imports core)."""
    proc = broken(tmp_path, "    config | kernels\n    core\n", "    core\n    config | kernels\n")
    assert proc.returncode != 0 and "megafusion.config is not allowed to import megafusion.core" in proc.stdout


def test_a_package_left_out_of_the_layers_fails(tmp_path):
    """The contract is exhaustive: a new package under megafusion/ must be given a layer."""
    proc = broken(tmp_path, "training | interop | planning\n", "training | interop\n")
    assert proc.returncode != 0 and "- megafusion.planning" in proc.stdout, proc.stdout[-2000:]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components of more than one module."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph("megafusion", cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    # A package's __init__ re-exporting its own modules is not a cycle of meaning.
    edges = {m: {d for d in deps if not (m.startswith(d + ".") or d.startswith(m + "."))} for m, deps in edges.items()}
    assert strongly_connected(edges) == []


def test_the_cycle_check_can_fail():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
