"""``palign settings [method=<name>] [overrides]``: a method's settings, each with its type, its
value in the composed config, its default and its help (from the method's ``Settings``)."""

from __future__ import annotations

import textwrap
from dataclasses import MISSING

from omegaconf import DictConfig, OmegaConf

from palign.config.build import method_class
from palign.config.schema import compose_checked
from palign.errors import cli
from palign.methods.checks import show


def describe(node: DictConfig) -> str:
    """The settings of the method config ``node`` (resolved), one entry per setting."""
    cls = method_class(node)
    values = OmegaConf.to_container(node, resolve=True)
    summary = (cls.__doc__ or "").strip().split("\n\n")[0]
    lines = [
        f"method={values.get('name') or cls.name}: {cls.__module__}.{cls.__qualname__}",
        *textwrap.wrap(" ".join(summary.split()), 96, initial_indent="  ", subsequent_indent="  "),
    ]
    described = cls.Settings.described()
    if not described:
        lines.append(f"  {cls.__name__} has no settings.")
    for f, type_name in described:
        default = cls.Settings.default_of(f)
        value = values.get(f.name, default)
        notes = []
        if default is not MISSING and value != default:
            notes.append(f"default {show(default)}")
        if f.metadata.get("follows"):
            notes.append(f"follows {f.metadata['follows']}")
        tail = f"  ({'; '.join(notes)})" if notes else ""
        lines.append(f"  {f.name}: {type_name} = {show(value)}{tail}")
        lines += textwrap.wrap(
            f.metadata.get("help", ""), 92, initial_indent="      ", subsequent_indent="      "
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the settings of the method the overrides select (``method=few_shot`` unless
    given), composed as a run would compose them."""
    with cli("palign settings"):
        if any(a in ("-h", "--help") for a in argv or []):
            print(__doc__.strip())
            return 0
        print(describe(compose_checked(list(argv or [])).method))
    return 0
