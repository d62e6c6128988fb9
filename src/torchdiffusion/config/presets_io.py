"""Presets (YAML data shipped with the package) and the resolution of a run's config."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from .schema import RunConfig
from .strict import _suggest, apply_overrides, from_dict, load_yaml


def preset_names() -> list[str]:
    root = resources.files(__package__) / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_summary(name: str) -> str:
    """One line about a shipped preset for `torchdiffusion list presets`: the first comment line of its YAML, up to
    its first ': ' (the rest of the comment is detail)."""
    text = (resources.files(__package__) / "presets" / f"{name}.yaml").read_text()
    first = next((line[1:].strip() for line in text.splitlines() if line.startswith("#")), "")
    return first.split(": ", 1)[0].rstrip(".")


def load_preset(name_or_path: str) -> dict:
    """A preset by name (see preset_names()) or a path to a YAML file."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        return load_yaml(Path(name_or_path))
    names = preset_names()
    if name_or_path not in names:
        raise ConfigError(f"unknown preset '{name_or_path}'{_suggest(name_or_path, names)}; valid: {', '.join(names)} "
                          f"(or a path to a .yaml file)")
    with resources.as_file(resources.files(__package__) / "presets" / f"{name_or_path}.yaml") as p:
        return load_yaml(p)


def resolve(base: dict, overrides: list[str]) -> RunConfig:
    """Defaults <- base (a preset or a run's saved config) <- --set overrides, strictly checked. Keys the base
    and the overrides leave out take the defaults of their section (for a section chosen by kind: that kind's)."""
    return from_dict(RunConfig, apply_overrides(base, overrides))
