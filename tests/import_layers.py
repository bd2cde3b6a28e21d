"""The package layers along the data flow, read from the sources (module-level and function-level imports alike):
shared by the import-rule tests and the docs test that keeps docs/design.md's layer table equal to the code's."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top: a unit (a package folder or a top-level module) imports only from units listed before it.
LAYERS = (
    "medfdd", "medfdd.errors", "medfdd.exit_codes", "medfdd.io", "medfdd.charts",  # foundation; PNG charts
    "medfdd.config", "privacy.accounting",  # typed configs; the accountant and the ledger (errors/io only)
    "medfdd.nets", "medfdd.augment", "medfdd.training", "medfdd.artifacts", "medfdd.messages", "medfdd.rundir",
    "medfdd.data",  # the site-data library: manifest, MONAI loading, quarantine, split, cache
    "medfdd.prepare",  # materialise a consortium from a labelled source
    "medfdd.distill", "medfdd.finetune",  # the algorithms, free of site bookkeeping
    "privacy.audit", "privacy.report",  # membership-inference audits and the privacy officer's report
    "medfdd.site",  # what `medfdd site ...` runs at a hospital
    "medfdd.coordinator",  # validate, merge, train, average: engine-neutral
    "medfdd.federation",  # engines: in-process, Flower and NVFlare
    "medfdd.baselines", "medfdd.demo", "medfdd.config_reference", "privacy.cli",  # entry points
    "medfdd.cli",
)
FIRST_PARTY = ("medfdd", "privacy")


def unit(module: str) -> str:
    """The longest LAYERS entry that `module` is or lies in (`privacy` itself counts as foundation)."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in LAYERS:
            return ".".join(parts[:k])
    return "medfdd" if module == "privacy" else module


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _first_party_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every first-party import, at any depth (function-level imports count too)."""
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(node.lineno, f"{target}.{a.name}" if unit(f"{target}.{a.name}") != unit(target)
                       and f"{target}.{a.name}" in LAYERS else target) for a in node.names]
    return [(n, m) for n, m in found if m.split(".")[0] in FIRST_PARTY]


def edges() -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, file:line) for every import between two different units."""
    found = []
    for top in FIRST_PARTY:
        for path in sorted((ROOT / top).rglob("*.py")):
            own = unit(module_of(path))
            for line, target in _first_party_imports(path):
                if unit(target) != own:
                    found.append((own, unit(target), f"{path.relative_to(ROOT)}:{line}"))
    return found


def layer_table() -> str:
    """docs/design.md's table: every unit, top layer first, with the units it imports."""
    used: dict[str, set[str]] = {u: set() for u in LAYERS}
    for a, b, _ in edges():
        used[a].add(b)
    rows = [f"| `{u}` | {', '.join(f'`{d}`' for d in sorted(used[u], key=LAYERS.index, reverse=True)) or '—'} |"
            for u in reversed(LAYERS)]
    return "\n".join(["| unit (top layer first) | imports |", "|---|---|", *rows])
