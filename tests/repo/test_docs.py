"""The docs hold the map to the tree, both ways, so that neither can drift from the other.

- every repository path that ``README.md``, ``docs/*.md`` and ``bench/README.md`` name exists:
  paths from the repository root (``megafusion/...``, ``tests/...``, ``bench/...``, ``examples/...``,
  ``launch/...``, ``docs/...``) and modules named relative to the package (``layers/routing.py``);
- the package tree of ``docs/architecture.md`` names every package and module under ``megafusion/``
  and every top-level folder, and nothing that does not exist;
- its ``ModelFamily`` and ``Objective`` tables list exactly the fields of the two specs;
- no link or path in those files leads outside the repository, and every relative link resolves;
- ``bench/results`` records paths of the repository, not of the machine a benchmark ran on.

Placeholders (``<name>``), globs (``*``) and brace lists (``{json,md}``, expanded) are understood.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGE = "megafusion"


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _top_level_folders() -> set[str]:
    """Tracked top-level folders (hidden ones aside); the filesystem's where git is absent."""
    try:
        files = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return {f.split("/")[0] for f in files if "/" in f and not f.startswith(".")}


TOP = _top_level_folders() | {"docs"}
SUBPACKAGES = {p.name for p in (ROOT / PACKAGE).iterdir() if (p / "__init__.py").exists()}

# A path-like token: word characters, dots, dashes, slashes, and brace lists / placeholders / globs.
_TOKEN = re.compile(r"[\w.{}<>*,/-]*/[\w.{}<>*,/-]*")


def _expand(token: str) -> list[str]:
    """``a/{b,c}.py`` -> ``[a/b.py, a/c.py]`` (several brace lists: every combination)."""
    parts = re.split(r"\{([^{}]*)\}", token)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _paths_named(text: str) -> list[tuple[str, str]]:
    """``(as written, repository path)`` for every repository path ``text`` names."""
    found = []
    for match in _TOKEN.finditer(text):
        token = match.group(0).rstrip(".,;:")
        if any(c in token for c in "<>*") or "//" in token or token.startswith(("/", ".")):
            continue
        for path in _expand(token):
            first = path.split("/")[0]
            if first in TOP:
                found.append((token, path))
            elif first in SUBPACKAGES and path.endswith(".py"):
                # Module paths relative to the package (`layers/routing.py`); other paths under such
                # a name (`data/my_set`) are a user's files in a command.
                found.append((token, f"{PACKAGE}/{path}"))
    return found


def _prose(path: Path) -> str:
    """The file's text without URLs (their paths are another site's)."""
    return re.sub(r"https?://\S+", "", path.read_text())


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_path_named_exists(doc):
    missing = sorted(
        {f"{path} (written `{token}`)" for token, path in _paths_named(_prose(doc)) if not (ROOT / path).exists()}
    )
    assert not missing, f"{_rel(doc)} names paths that do not exist (fix the doc or the path):\n  " + "\n  ".join(
        missing
    )


_TEST_NAMED = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_test_named_exists(doc):
    """`tests/x.py::test_name` names a test function defined in that file."""
    missing = []
    for path, name in sorted(set(_TEST_NAMED.findall(doc.read_text()))):
        file = ROOT / path
        if not file.exists() or not re.search(rf"^\s*(async )?def {name}\(", file.read_text(), re.M):
            missing.append(f"{path}::{name}" + ("" if file.exists() else f" ({path} does not exist)"))
    assert not missing, f"{_rel(doc)} names tests that do not exist (fix the name or the path):\n  " + "\n  ".join(
        missing
    )


def test_readme_keeps_the_two_commands_ci_reads():
    """`.ci/run` runs the line after "# 2. set up and run the tests"; the main job is the line after "# 1."."""
    lines = (ROOT / "README.md").read_text().splitlines()
    for header in ("# 1. set up and run the main job", "# 2. set up and run the tests"):
        at = [i for i, line in enumerate(lines) if line.startswith(header)]
        assert len(at) == 1, f"README.md must have exactly one line starting with {header!r} (found {len(at)})"
        command = lines[at[0] + 1] if at[0] + 1 < len(lines) else ""
        assert command.startswith("python3 -m venv"), f"README.md: the line after {header!r} is not its command"


def _tree_block() -> list[str]:
    """The lines of the code block under docs/architecture.md's "## 2." heading."""
    text = ARCHITECTURE.read_text()
    section = re.search(r"^## 2\..*?^```\n(.*?)^```", text, re.S | re.M)
    assert section, 'docs/architecture.md has no "## 2. ..." section with a ``` tree block'
    return section.group(1).splitlines()


# An entry: up to 12 spaces of indentation, a name (a folder ends in "/"), then a space or the end.
_ENTRY = re.compile(r"^( {0,12})([\w.-]+/?)(?: |$)")


def tree_entries() -> list[str]:
    """Repository paths the tree names, built from the indentation (2 spaces per level).
    Lines indented further than an entry can be are its description's continuation."""
    stack: list[tuple[int, str]] = []
    entries = []
    for line in _tree_block():
        m = _ENTRY.match(line)
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "/".join([*(n.rstrip("/") for _, n in stack), name])
        entries.append(path)
        if name.endswith("/"):
            stack.append((indent, name))
    return entries


def test_tree_entries_exist():
    missing = [p for p in tree_entries() if not (ROOT / p).exists()]
    assert not missing, "docs/architecture.md's tree (section 2) names paths that do not exist:\n  " + "\n  ".join(
        missing
    )


def _modules_and_packages() -> list[str]:
    tracked = subprocess.run(
        ["git", "ls-files", PACKAGE], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    found = set()
    for f in tracked:
        if not f.endswith(".py"):
            continue
        parent = f.rsplit("/", 1)[0]
        if parent != PACKAGE:
            found.add(parent + "/")
        if not f.endswith("/__init__.py"):
            found.add(f)
    return sorted(found)


def test_tree_names_every_module_and_top_level_folder():
    named = set(tree_entries())
    missing = [p for p in _modules_and_packages() if p not in named]
    missing += [f"{d}/ (a top-level folder)" for d in sorted(TOP) if f"{d}/" not in named]
    assert not missing, (
        "docs/architecture.md's tree (section 2) does not name (add one line each, what it holds):\n  "
        + "\n  ".join(missing)
    )


def _table_names(heading: str) -> list[str]:
    """The names in the first column of the first table under the ``### {heading}`` heading:
    every backticked name, its arguments left out (`copies(cfg, part)` -> copies)."""
    text = ARCHITECTURE.read_text()
    section = re.search(rf"^### {re.escape(heading)}\b.*?\n(\|.*?)(?:\n\n|\Z)", text, re.S | re.M)
    assert section, f"docs/architecture.md has no table under a '### {heading}' heading"
    names = []
    for row in section.group(1).splitlines()[2:]:
        first = row.split("|")[1]
        names += [n.split("(")[0].strip() for n in re.findall(r"`([^`]+)`", first)]
    return names


def _spec_members(cls) -> set[str]:
    """A dataclass's fields; else the public attributes and methods a subclass may set."""
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return {n for c in cls.__mro__ if c is not object for n in vars(c) if not n.startswith("_")}


@pytest.mark.parametrize(
    "heading, module, cls",
    [
        ("ModelFamily", "megafusion.models.spec", "ModelFamily"),
        ("Objective", "megafusion.objectives.spec", "Objective"),
    ],
)
def test_spec_tables_list_every_field(heading, module, cls):
    import importlib

    members = _spec_members(getattr(importlib.import_module(module), cls))
    listed = _table_names(heading)
    problems = [f"{n}: a field of {module}.{cls}, missing from the table" for n in sorted(members - set(listed))]
    problems += [f"{n}: in the table, not a field of {module}.{cls}" for n in sorted(set(listed) - members)]
    problems += [f"{n}: listed twice" for n in sorted({n for n in listed if listed.count(n) > 1})]
    assert not problems, f"docs/architecture.md's {heading} table (section 4):\n  " + "\n  ".join(problems)


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_links_stay_inside_the_repository(doc):
    problems = []
    text = doc.read_text()
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in this file
        resolved = (doc.parent / target.split("#")[0]).resolve()
        if not resolved.is_relative_to(ROOT):
            problems.append(f"link ({target}) leads outside the repository")
        elif not resolved.exists():
            problems.append(f"link ({target}) names nothing: {_rel(resolved)} does not exist")
    # Paths written as text are read from the repository root: `../x` is outside it.
    for token in re.findall(r"(?<![\w/.])(?:\.\./)+[\w./-]*", _LINK.sub("]", _prose(doc))):
        if not (ROOT / token).resolve().is_relative_to(ROOT):
            problems.append(f"`{token}` is outside the repository: a reader of a clone does not have it")
    assert not problems, f"{_rel(doc)}:\n  " + "\n  ".join(problems)


# An absolute path of a machine: /tmp/..., /work/..., /home/... (not a URL's path).
_MACHINE_PATH = re.compile(r"(?<![\w.:/])/(?:tmp|work|home|root|scratch|Users|mnt|var)/[\w./-]*")


def test_results_record_repository_paths():
    problems = []
    for path in sorted((ROOT / "bench" / "results").glob("*")):
        if path.suffix in (".md", ".json"):
            problems += [f"{_rel(path)}: {m}" for m in sorted(set(_MACHINE_PATH.findall(path.read_text())))]
    assert not problems, (
        "bench/results records paths of a machine, not of the repository (record them relative to the "
        "repository; a scratch --out is not part of the result):\n  " + "\n  ".join(problems)
    )


def test_recorded_command_names_no_machine_path():
    from bench.provenance import ROOT as REPO
    from bench.provenance import recorded_command

    argv = ["--out", "/tmp/x.json", f"logging.out_dir={REPO}/runs/a", "--out=bench/results/x.json", "--steps", "3"]
    assert recorded_command("bench.x", argv) == (
        "python -m bench.x logging.out_dir=runs/a --out=bench/results/x.json --steps 3"
    )
