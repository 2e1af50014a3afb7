"""docs/configuration.md is generated from the config model and must match it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from xiaoai_bridge.config import Settings
from xiaoai_bridge.configdoc import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_configuration_reference_is_up_to_date() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale: run "
        "`.venv/bin/python -m xiaoai_bridge.configdoc > docs/configuration.md`"
    )


def test_every_setting_is_documented() -> None:
    text = render()

    def check(model: type[BaseModel], path: list[str]) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                assert f"## [{'.'.join([*path, name])}]" in text
                check(annotation, [*path, name])
            else:
                assert f"`{name}`" in text, f"{'.'.join([*path, name])} is missing"

    check(Settings, [])
