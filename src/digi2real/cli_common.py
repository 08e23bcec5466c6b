"""What every sub-command's parser shares: the one-line error contract, the help layout, the common flags and the
config loading (YAML, then the stage flags that were given, then ``--set``). A public module below `cli` and the stage
command modules, which all import it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def one_line(text: str, limit: int = 600) -> str:
    """An error message as the one line the CLI promises (newlines folded, very long values cut)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Parser(argparse.ArgumentParser):
    """argparse with the project's error contract: a usage error is one line (``digi2real: error: ...``) naming the
    command and pointing at its --help, exit status 2, like every other refusal."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"digi2real: error: {self.prog}: {one_line(message)}; see `{self.prog} --help`\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """As argparse's, but a stray argument is reported by the sub-command it was given to (its --help)."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
            owner = sub.choices.get(getattr(ns, "command", None) or "", self) if sub is not None else self
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def formatter(prog: str) -> argparse.HelpFormatter:
    """Descriptions and epilogs keep their line breaks (examples stay readable)."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_common(p: argparse.ArgumentParser) -> None:
    """--config, --set and -q, as every stage command takes them."""
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="experiment config: a YAML file or a shipped config's name (e.g. digi2real-20k; `digi2real "
                   "config list`); flags override its values")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value by dotted key, e.g. --set plan.alpha=1 (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def load_config(args: argparse.Namespace, flags: dict[str, Any]):
    """Experiment config from --config, then the stage flags that were given, then --set (last wins)."""
    from digi2real.config import load_experiment, parse_override

    overrides = dict(flags)
    for item in args.set:
        keys, value = parse_override(item)
        overrides[".".join(keys)] = value
    return load_experiment(args.config, overrides)


def given(**values: Any) -> dict[str, Any]:
    """The flags that were given, as dotted overrides: ``given(plan__alpha=1.0, plan__seed=None)`` is
    ``{"plan.alpha": 1.0}``."""
    return {k.replace("__", "."): v for k, v in values.items() if v is not None}
