"""`torchdiffusion list samplers|presets|methods`: the names a command accepts, one line each, from the registry
tables (config/registry.py: SAMPLER_SUMMARIES, INVERSE_SUMMARIES) and the presets' own first comment line."""
from __future__ import annotations

import click

WHAT = ("samplers", "presets", "methods")


def listing(what: str) -> list[tuple[str, str]]:
    """(name, one-line description) of every entry of a listing, in the registry's order (presets by name)."""
    from ..config import registry
    if what == "samplers":
        return [(name, registry.SAMPLER_SUMMARIES.get(name, "")) for name in registry.SAMPLERS]
    if what == "methods":
        aliases = {b: a for a, b in registry.INVERSE_ALIASES.items()}
        return [(name + (f" ({aliases[name]})" if name in aliases else ""), registry.INVERSE_SUMMARIES.get(name, ""))
                for name in registry.INVERSE_METHODS]
    from ..config.presets_io import preset_names, preset_summary
    return [(name, preset_summary(name)) for name in preset_names()]


@click.command("list")
@click.argument("what", type=click.Choice(WHAT))
def list_cmd(what):
    """List the samplers (sample --sampler), presets (train --preset) or restore methods (restore --method)."""
    rows = listing(what)
    width = max(len(name) for name, _ in rows)
    for name, summary in rows:
        click.echo(f"{name:<{width}}  {summary}".rstrip())


__all__ = ["list_cmd", "listing"]
