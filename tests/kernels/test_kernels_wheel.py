"""A built wheel carries the kernels of the top-level kernels/ folder as ``megafusion.kernels``.

The sources sit at the top of the repository and setup.py maps them into the package; the editable
install and a source tree on PYTHONPATH reach them through the link ``megafusion/kernels``. This test
builds a real wheel (offline, from a copy of the tree, so the checkout gets no build/ folder),
installs it into a folder of its own and imports the kernels from there, with no checkout on the path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from megafusion.ops import backends
from tests.helpers import ROOT

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


def pip(*args: str, cwd) -> None:
    proc = subprocess.run([*PIP, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """``pip wheel`` of a copy of the installable part of the tree: the path of the .whl."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for part in ("megafusion", "kernels"):
        shutil.copytree(ROOT / part, src / part, symlinks=True, ignore=ignore)
    shutil.copy2(ROOT / "setup.py", src / "setup.py")
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    (whl,) = (tmp / "dist").glob("megafusion-*.whl")
    return whl


def test_the_wheel_holds_every_kernel_source_under_megafusion_kernels(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert {"__init__.py", "grouped_gemm.py", "compile_check.py"} <= set(sources)
    missing = [s for s in sources if f"megafusion/kernels/{s}" not in names]
    assert not missing, f"kernels/ sources not in the wheel as megafusion/kernels: {missing}"
    # a top-level `kernels` package would shadow (or be shadowed by) another distribution's `kernels`
    assert not [n for n in names if n.startswith("kernels/")], sorted(names)


@pytest.mark.skipif(not backends.triton_installed(), reason="triton is not installed")
def test_the_installed_wheel_imports_its_kernels_without_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    pip("install", "--no-deps", "--no-index", "--no-compile", "--target", str(target), str(wheel), cwd=tmp_path)
    code = (
        "import megafusion, megafusion.kernels.grouped_gemm as g; "
        "print(megafusion.__file__); print(g.__file__); "
        "print(hasattr(g, 'gather_gemm_scatter') and hasattr(g, 'group_weight_grad'))"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, kernel, has_kernel = proc.stdout.split()
    assert package == str(target / "megafusion" / "__init__.py")
    assert kernel == str(target / "megafusion" / "kernels" / "grouped_gemm.py")
    assert has_kernel == "True"
