#!/usr/bin/env python3
"""Print the third-party requirements of an image or of the dev workspace, one a line.

    python deploy/requirements.py server   # presence-daemon (and presence-client's own)
    python deploy/requirements.py client   # presence-client[terminal]
    python deploy/requirements.py dev      # the root pyproject's [dependency-groups] dev
    python deploy/requirements.py 'presence-daemon[embedded]'

Read from client/pyproject.toml and daemon/pyproject.toml with tomllib (no other
import), so an image can install its dependencies in a layer of their own before any
source is copied. The two local distributions are expanded into their requirements (and
those of the extras asked for), never printed: they are installed from source, with
``--no-deps``, afterwards.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
PROJECTS: Final = ("client", "daemon")
TARGETS: Final = {"server": "presence-daemon", "client": "presence-client[terminal]"}
REQUIREMENT: Final = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def load(root: Path, path: str) -> dict[str, Any]:
    with (root / path / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def local_projects(root: Path) -> dict[str, dict[str, Any]]:
    """The [project] tables of the local distributions, by normalized name (an image's
    build copies only the pyproject files it needs: the client's has no daemon's)."""
    projects = {}
    for path in PROJECTS:
        if not (root / path / "pyproject.toml").is_file():
            continue
        project = load(root, path)["project"]
        projects[normalize(project["name"])] = project
    return projects


def expand(spec: str, projects: dict[str, dict[str, Any]], seen: set[tuple[str, str]]) -> list[str]:
    """Third-party requirements of ``spec``: itself, or a local project's, recursively."""
    match = REQUIREMENT.match(spec)
    if match is None:
        raise ValueError(f"not a requirement: {spec!r}")
    name = normalize(match[1])
    if name not in projects:
        return [spec.strip()]
    extras = [normalize(e) for e in (match[2] or "").split(",") if e.strip()]
    project = projects[name]
    optional = {normalize(k): v for k, v in project.get("optional-dependencies", {}).items()}
    wanted: list[tuple[str, list[str]]] = [("", project.get("dependencies", []))]
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"{project['name']} has no extra {extra!r}")
        wanted.append((extra, optional[extra]))
    found: list[str] = []
    for key, requirements in wanted:
        if (name, key) in seen:
            continue
        seen.add((name, key))
        for requirement in requirements:
            found += expand(requirement, projects, seen)
    return found


def requirements(target: str, root: Path = ROOT) -> list[str]:
    """The requirements of ``server``, ``client``, ``dev``, or a local ``NAME[EXTRAS]``."""
    if target == "dev":
        listed: list[str] = list(load(root, ".")["dependency-groups"]["dev"])
        return listed
    projects = local_projects(root)
    spec = TARGETS.get(target, target)
    match = REQUIREMENT.match(spec)
    if match is None or normalize(match[1]) not in projects:
        names = ", ".join([*TARGETS, "dev", *projects])
        raise ValueError(f"unknown target {target!r} (one of {names}, with [extras])")
    unique: dict[str, None] = {}
    for requirement in expand(spec, projects, set()):
        unique.setdefault(requirement)
    return list(unique)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: requirements.py server|client|dev|NAME[EXTRAS]", file=sys.stderr)
        return 2
    try:
        lines = requirements(argv[0])
    except ValueError as exc:
        print(f"requirements.py: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
