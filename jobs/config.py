"""YAML job configs: sections of dataclasses, with unknown keys named in the error."""

from __future__ import annotations

from typing import Any


def parse_sections(raw: dict[str, Any], sections: dict[str, type], where: str) -> dict[str, Any]:
    """Build each named section's dataclass from ``raw``, refusing keys the dataclass does not have."""
    built = {}
    for name, section in sections.items():
        values = raw.get(name) or {}
        bad = set(values) - set(section.__dataclass_fields__)
        if bad:
            raise ValueError(f"{where}: unknown keys in '{name}': {sorted(bad)}; "
                             f"allowed: {sorted(section.__dataclass_fields__)}")
        built[name] = section(**values)
    return built
