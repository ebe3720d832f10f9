"""Options and helpers every stage command shares: --config, --force, --seed, --workers, --shard."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # recent typer vendors its own click
    from typer._click.exceptions import BadParameter, ClickException
except ImportError:  # pragma: no cover - older typer on the click package
    from click.exceptions import BadParameter, ClickException

from ..errors import UsageError

__all__ = [
    "ClickException", "ConfigOpt", "DefaultGroup", "ForceOpt", "SeedOpt", "ShardOpt", "WorkersOpt", "parse_shard",
    "read_toml",
]


def read_toml(path: Path) -> dict[str, Any]:
    """A --config file's contents, or a one-line UsageError naming what is wrong with it."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UsageError(f"{path}: config file not found; check the --config path") from e
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{path}: not a valid TOML config ({e}); fix the file") from e


def _load_config(ctx: Any, param: Any, value: Path | None) -> Path | None:
    """Read a TOML file into the command's defaults, so the command line still wins over it.

    The file may hold the options at top level or under a table named after the command
    (``[crawl]``); keys use the option names with dashes or underscores.
    """
    if value is None:
        return None
    data = read_toml(value)
    name = ctx.info_name or ""
    section = data.get(name) if isinstance(data.get(name), dict) else None
    options = section if section is not None else {k: v for k, v in data.items() if not isinstance(v, dict)}
    known = {p.name: p for p in ctx.command.params if p.name and p.name != "config"}
    defaults: dict[str, Any] = {}
    for key, v in options.items():
        k = key.replace("-", "_")
        if k not in known:
            raise UsageError(f"{value}: unknown option '{key}' for '{name}'; see llmctl {name} --help")
        if getattr(known[k], "param_type_name", "") == "argument":
            raise UsageError(f"{value}: '{key}' is a positional argument; give it on the command line")
        _check_value(value, key, v, known[k], ctx)
        defaults[k] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _check_value(path: Path, key: str, v: Any, param: Any, ctx: Any) -> None:
    """A config value the option's type cannot take is the file's fault: say so, naming the file
    (click would report it as a bad command-line value)."""
    if getattr(param, "callback", None) is not None:  # eager options such as --version act when processed
        return
    try:
        param.process_value(ctx, v)
    except BadParameter as e:
        raise UsageError(f"{path}: {key} = {v!r}: {e.message}; fix the file") from None


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML file setting any option of this command (the command line wins).",
        is_eager=True,
        callback=_load_config,
        dir_okay=False,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if OUT is already complete.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-w", min=1, help="Worker processes on this machine.")]
ShardOpt = Annotated[
    str,
    typer.Option("--shard", help="I/N: process only part I (0-based) of N, e.g. one task of a job array."),
]


def parse_shard(spec: str) -> tuple[int, int]:
    """'I/N' → (I, N) with 0 ≤ I < N."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UsageError(f"--shard {spec!r}: expected I/N such as 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {spec!r}: need 0 ≤ I < N, e.g. 0/4 … 3/4")
    return i, n


class DefaultGroup(typer.core.TyperGroup):
    """A command group that runs its default subcommand when the first argument names none.

    Lets ``llmctl filter DOCS --out DIR`` and ``llmctl filter train-quality …`` live side by side.
    """

    default_command = "run"

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)
