"""``refproxy plugins``: list the installed conntrack-cleanup plugins.

Contract: presentation only. Discovery and its error handling live in
``registry.py``; a plugin that fails to load is shown with its error (exit
status stays 0, so one broken third-party package does not hide the others),
except when it is the one asked for by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from refproxy.cleanup.registry import PluginInfo, discover
from refproxy.errors import PluginError

__all__ = ["add_arguments", "main", "format_text", "as_json"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``refproxy plugins``."""
    p.add_argument("name", nargs="?", help="show only this plugin (error if it is not installed or broken)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def as_json(infos: list[PluginInfo]) -> list[dict]:
    """The JSON shape: one object per plugin, options as a list."""
    return [
        {
            "name": i.name,
            "entry_point": i.value,
            "api_version": i.api_version,
            "description": i.description,
            "options": [{"name": o.name, "default": o.default, "help": o.help} for o in i.options],
            "load_error": i.load_error,
        }
        for i in infos
    ]


def format_text(infos: list[PluginInfo]) -> str:
    """The human listing: name, API version, description, then options."""
    if not infos:
        return "no cleanup plugins installed (entry-point group refproxy.cleanup)\n"
    width = max(len(i.name) for i in infos)
    lines = []
    for i in infos:
        if i.load_error is not None:
            lines.append(f"{i.name:<{width}}  BROKEN  {i.value}")
            lines.append(f"{'':<{width}}          {i.load_error}")
            continue
        lines.append(f"{i.name:<{width}}  api {i.api_version}  {i.description}")
        if i.options:
            ow = max(len(o.name) + 1 + len(o.default or "") for o in i.options)
            for o in i.options:
                kv = f"{o.name}={o.default or ''}"
                lines.append(f"{'':<{width}}    {kv:<{ow}}  {o.help}")
    lines.append("")
    lines.append("use: refproxy run --cleanup-plugin NAME [--cleanup-plugin-opt KEY=VALUE ...]")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """List plugins; raise ``PluginError`` when the named one is missing or broken."""
    out = out or sys.stdout
    found = discover()
    infos = list(found.values())
    if args.name:
        if args.name not in found:
            raise PluginError(
                f"unknown cleanup plugin {args.name!r}; installed: {', '.join(found) if found else '(none)'}"
            )
        infos = [found[args.name]]
    if args.json:
        out.write(json.dumps(as_json(infos), indent=2) + "\n")
    else:
        out.write(format_text(infos))
    if args.name and infos[0].load_error is not None:
        raise PluginError(infos[0].load_error)
    return 0
