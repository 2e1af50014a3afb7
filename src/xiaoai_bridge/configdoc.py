"""Renders docs/configuration.md from the config model, so the reference never drifts."""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from xiaoai_bridge.config import ENV_PREFIX, Settings

HEADER = """# Configuration reference

Generated from the config model (`python -m xiaoai_bridge.configdoc > docs/configuration.md`;
a test fails when this file is out of date). The commented example is
[`xiaoai-bridge.example.toml`](../xiaoai-bridge.example.toml).

Settings come from one TOML file (`--config FILE`, else `$XIAOAI_BRIDGE_CONFIG`, else
`./xiaoai-bridge.toml`, else `~/.config/xiaoai-bridge/config.toml`) and from environment
variables, which win: `XIAOAI_BRIDGE_<SECTION>__<KEY>`, e.g. `XIAOAI_BRIDGE_LLM__MODEL`.
`OPENAI_API_KEY` and `OPENAI_BASE_URL` fill `[llm] api_key` and `base_url` when neither the file
nor `XIAOAI_BRIDGE_LLM__*` set them. Secrets are never logged and are masked on the status page.
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is typing.Literal:
        return " / ".join(json.dumps(arg, ensure_ascii=False) for arg in args)
    if origin in (tuple, list):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"table of {_type_name(args[1])}"
    if annotation is SecretStr:
        return "secret"
    if annotation is type(None):
        return "unset"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
        if isinstance(value, Path):
            return "`$XDG_DATA_HOME/xiaoai-bridge` (`~/.local/share/xiaoai-bridge`)"
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, tuple):
        value = list(value)
    text = json.dumps(value, ensure_ascii=False)
    return f"`{text}`" if len(text) <= 60 else f"`{text[:57]}...`"


def _table_list_item(annotation: Any) -> type[BaseModel] | None:
    """The model of a `[[array.of.tables]]` field, e.g. tuple[McpServerSettings, ...]."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (tuple, list) and args:
        item = args[0]
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
    return None


def _section(
    model: type[BaseModel], path: list[str], lines: list[str], *, array: bool = False
) -> None:
    rows: list[str] = []
    nested: list[tuple[str, type[BaseModel]]] = []
    arrays: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((name, annotation))
            continue
        item = _table_list_item(annotation)
        if item is not None:
            arrays.append((name, item))
        env = "`" + ENV_PREFIX + "__".join(part.upper() for part in [*path, name]) + "`"
        if array:
            env = "-"
        description = (field.description or "").replace("|", "\\|").replace("<", "&lt;")
        rows.append(
            f"| `{name}` | {_type_name(annotation)} | {_default(field)} | {description} | {env} |"
        )
    if rows:
        title = f"[{'.'.join(path)}]" if path else "Top level"
        if array:
            title = f"[{title}] (one table per entry; no environment variables)"
        lines.append(f"\n## {title}\n")
        doc = (model.__doc__ or "").strip().splitlines()[0] if path else ""
        if doc:
            lines.append(f"{doc}\n")
        lines.append("| key | type | default | meaning | environment |")
        lines.append("|---|---|---|---|---|")
        lines.extend(rows)
    for name, sub in nested:
        _section(sub, [*path, name], lines)
    for name, sub in arrays:
        _section(sub, [*path, name], lines, array=True)


def render() -> str:
    """The whole reference as Markdown."""
    lines = [HEADER.rstrip()]
    _section(Settings, [], lines)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
