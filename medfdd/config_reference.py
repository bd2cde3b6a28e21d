"""The config reference tables of docs/configuration.md and the JSON Schemas under docs/schemas/, generated from the
pydantic models (`make docs` rewrites them; a test fails when either disagrees with the models)."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from medfdd.config import SCHEMA_FILE, SCHEMA_MODELS, Agreement, CoordinatorConfig, SiteConfig, schema_text
from medfdd.io import atomic_write_text

TABLES = {"site": SiteConfig, "coordinator": CoordinatorConfig, "agreement": Agreement}
DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
SCHEMAS = DOC.parent / "schemas"  # one JSON Schema per config kind, for editors (site_configs/*.yaml point here)
LEAVES = {"intensity"}  # unions documented in their description


def _submodel(annotation) -> type[BaseModel] | None:
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _show(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, BaseModel):
        return "`{" + ", ".join(f"{k}: {v}" for k, v in value.model_dump(mode="json").items()) + "}`"
    return f"`{value}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    out = []
    for name, f in model.model_fields.items():
        if f.exclude:
            continue
        key = prefix + name
        sub = _submodel(f.annotation)
        optional_sub = sub is not None and f.default is None
        if f.default is PydanticUndefined and f.default_factory is None:
            default = "required"
        elif f.default_factory is not None:
            default = _show(f.default_factory())
        else:
            default = _show(f.default)
        if sub is not None and name not in LEAVES and not optional_sub:
            if default == "required" or f.default_factory is not None:
                out += rows(sub, key + ".")
                continue
        out.append((f"`{key}`", default, (f.description or "").replace("|", "\\|")))
        if optional_sub:
            out += rows(sub, key + ".")
    return out


def table(model: type[BaseModel]) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| {k} | {d} | {m} |" for k, d, m in rows(model)]
    return "\n".join(lines)


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- config-reference:{name} -->\n)(.*?)(\n<!-- /config-reference:{name} -->)", re.S)


def render(readme: str) -> str:
    """Markdown text with every generated table replaced by the models' current reference."""
    for name, model in TABLES.items():
        generated = table(model)
        readme = _block(name).sub(lambda m, t=generated: m.group(1) + t + m.group(3), readme)
    return readme


def schema_path(kind: str) -> Path:
    return SCHEMAS / SCHEMA_FILE.format(kind=kind)


def main() -> None:
    atomic_write_text(DOC, render(DOC.read_text()))
    for kind in SCHEMA_MODELS:
        atomic_write_text(schema_path(kind), schema_text(kind))


if __name__ == "__main__":
    main()
