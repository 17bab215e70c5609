"""``data.domains``: the domains of a run and the ones it trains (pure Python: validation reads them
before anything is built, :mod:`megafusion.data.domains` builds their sources).

A domain is one built-in set of ``data.builtin`` (``source=builtin``) or one dataset of
``data.blend`` by its name (``source=indexed``; ``data.path`` alone is one domain, its basename).
``data.domains`` names the ones that train: ``"shapes,digits"`` (at their natural shares) or
``{shapes: 1, digits: 2}`` (token weights); null trains on all of the data as before.
"""

from __future__ import annotations

import os


def builtin_names(builtin: str) -> list[str]:
    """The sets of ``data.builtin``, in order, each once."""
    return list(dict.fromkeys(x.strip() for x in builtin.split(",") if x.strip()))


def blend_names(blend: list | None, path: str | None) -> list[str]:
    """The name of each dataset of ``data.blend`` (its ``name``, else its path's basename; a
    repeated name gets ``#2``, ``#3``, ...), or of ``data.path`` alone."""
    if not blend:
        return [os.path.basename(str(path))]
    names, seen = [], {}
    for entry in blend:
        entry = entry if isinstance(entry, dict) else {}  # a malformed entry: validation says so
        name = str(entry.get("name") or os.path.basename(str(entry.get("path"))))
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


def run_domains(d) -> list[str]:
    """Every domain of the run (the data config ``d``), whatever ``data.domains`` trains."""
    if d.source == "builtin":
        return builtin_names(d.builtin)
    if d.source == "indexed":
        return blend_names(d.blend, d.path)
    return []


def selected_domains(domains) -> dict[str, float | None]:
    """``data.domains`` as ``{name: token weight}`` (None for the plain list's natural shares), in
    the order given; {} for null."""
    if not domains:
        return {}
    if isinstance(domains, dict):
        return {str(k): v for k, v in domains.items()}
    return dict.fromkeys(x.strip() for x in str(domains).split(",") if x.strip())


def domain_problems(d) -> list[str]:
    """Problems of ``data.domains`` for the data config ``d`` (each one line with its fix)."""
    if d.domains is None:
        return []
    if d.source == "synthetic":
        return [
            "data.domains is for data.source=builtin (sets of data.builtin) or indexed (entries of data.blend), "
            "not synthetic: drop data.domains or set data.source"
        ]
    where = "data.builtin" if d.source == "builtin" else "data.blend"
    known = run_domains(d)
    chosen = selected_domains(d.domains)
    if not chosen:
        return [f"data.domains={d.domains!r} names no domain: name some of {', '.join(known)}, or set it to null"]
    problems = []
    unknown = [n for n in chosen if n not in known]
    if unknown:
        problems.append(
            f"data.domains names {unknown}, not domains of this run: a domain is a set of {where} "
            f"(here {', '.join(known) or 'none'}); add it to {where} or drop it from data.domains"
        )
    for name, w in chosen.items():
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0):
            problems.append(
                f"data.domains.{name}={w!r} must be a number > 0 (its share of the trained tokens, relative "
                f"to the others): set a positive weight, or drop {name} from data.domains"
            )
    return problems


__all__ = ["blend_names", "builtin_names", "domain_problems", "run_domains", "selected_domains"]
