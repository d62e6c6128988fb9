"""Presets (YAML data shipped with the package) and the resolution of a run's config."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from .schema import RunConfig
from .strict import _suggest, apply_overrides, from_dict, load_yaml


def preset_names(folder: str = "") -> list[str]:
    """The shipped presets of a family: "" the diffusion runs', "ae" train-ae's, "tokens" train-tokens'."""
    root = resources.files(__package__) / "presets" / folder if folder else resources.files(__package__) / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_summary(name: str) -> str:
    """One line about a shipped preset for `torchdiffusion list presets`: the first comment line of its YAML, up to
    its first ': ' (the rest of the comment is detail)."""
    text = (resources.files(__package__) / "presets" / f"{name}.yaml").read_text()
    first = next((line[1:].strip() for line in text.splitlines() if line.startswith("#")), "")
    return first.split(": ", 1)[0].rstrip(".")


def load_preset(name_or_path: str, folder: str = "", what: str = "preset") -> dict:
    """A preset of a family (preset_names(folder)) by name, or a path to a YAML file; `what` names the family in
    the error ("autoencoder preset", "token preset")."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        return load_yaml(Path(name_or_path))
    names = preset_names(folder)
    if name_or_path not in names:
        raise ConfigError(f"unknown {what} '{name_or_path}'{_suggest(name_or_path, names)}; valid: {', '.join(names)} "
                          f"(or a path to a .yaml file)")
    root = resources.files(__package__) / "presets"
    with resources.as_file((root / folder if folder else root) / f"{name_or_path}.yaml") as p:
        return load_yaml(p)


def resolve(base: dict, overrides: list[str]) -> RunConfig:
    """Defaults <- base (a preset or a run's saved config) <- --set overrides, strictly checked. Keys the base
    and the overrides leave out take the defaults of their section (for a section chosen by kind: that kind's)."""
    return from_dict(RunConfig, apply_overrides(base, overrides))
