"""The llmctl command line: one subcommand per stage, parsing and printing only.

Each stage's command lives in its own module here and calls the stage's ``run`` function; errors
raised as ``LlmctlError`` become one line on stderr and exit code 1 (runtime) or 2 (usage).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from typing import Annotated

import typer

from .. import __version__
from ..console import console
from ..errors import LlmctlError
from .common import ClickException

#: the stages in pipeline order; a stage is on the CLI once its module exists in this package
STAGES = (
    "crawl", "extract", "filter", "dedup", "tokenize", "pretrain", "generate", "export",
    "sft", "reward", "ppo", "dpo", "eval", "scaling_fit",
)


class _PipelineOrder(typer.core.TyperGroup):
    """Lists the commands in pipeline order (typer would put groups after plain commands)."""

    def list_commands(self, ctx):  # type: ignore[override]
        rank = {name.replace("_", "-"): i for i, name in enumerate(STAGES)}
        return sorted(super().list_commands(ctx), key=lambda n: (rank.get(n, len(rank)), n))


app = typer.Typer(
    name="llmctl",
    cls=_PipelineOrder,
    help="Build a language model from scratch: web pages in, an aligned chat model and its measurements out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug or os.environ.get("LLMCTL_DEBUG") == "1"


def _register(argv: list[str] | None = None) -> None:
    """Import each stage's command module; importing it adds its command(s) to ``app``.

    When ``argv`` names a stage (its first word), only that stage's module is imported: typer
    then builds one command instead of all of them (~0.15 s less start-up for every run)."""
    first = next((a for a in argv or [] if not a.startswith("-")), "").replace("-", "_")
    names = [first] if first in STAGES and importlib.util.find_spec(f"{__name__}.{first}") else STAGES
    for name in names:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            importlib.import_module(f"{__name__}.{name}")


def reflow(doc: str) -> str:
    """A docstring as help text: the lines of each prose paragraph joined (typer's rich mode keeps
    every source line break after the first paragraph, which a narrow terminal then breaks again);
    a paragraph with indented lines (an example) keeps its lines."""
    paras = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(p if any(line[:1].isspace() for line in p.splitlines()) else " ".join(p.split("\n")) for p in paras)


def _reflow_help(t: typer.Typer) -> None:
    """Give every command of ``t`` (and of its sub-apps) its docstring reflowed as its help."""
    for info in t.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            info.help = reflow(info.callback.__doc__)
    for group in t.registered_groups:
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


def _leave_if_torchrun_rank() -> None:
    """A torchrun rank whose stage finished leaves at once, without the interpreter's teardown.

    Its work is done: the artifact is published (rank 0), every rank has passed the closing barrier
    and left the process group. Yet three times in recent test-suite runs (twice in fresh-clone CI,
    never reproduced alone in 30+ tries) rank 1 died after that point, in C++ teardown, with
    "terminate called without an active exception" (SIGABRT), and torchrun then reported the
    finished job as failed. ``os._exit`` skips that teardown; stdout, stderr and logging are
    flushed first, and nothing else is left to write.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    _register(argv)
    _reflow_help(app)
    debug = "--debug" in argv or os.environ.get("LLMCTL_DEBUG") == "1"
    try:
        # outside standalone mode click returns an Exit's code instead of exiting, and typer turns
        # Ctrl-C into Exit(130): a non-zero return is that, and must not become exit status 0
        code = app(args=argv, prog_name="llmctl", standalone_mode=False)
        if isinstance(code, int) and code != 0:
            if code == 130:
                console.print("[bold red]interrupted[/]: rerun the same command to resume")
            sys.exit(code)
        _leave_if_torchrun_rank()
    except LlmctlError as e:
        if debug:
            console.print_exception()
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        console.print("[bold red]aborted[/]")
        sys.exit(130)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: rerun the same command to resume")
        sys.exit(130)
    except ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:
        if debug:
            console.print_exception()
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        console.print(f"[bold red]error:[/] {where}{e.strerror or e}", soft_wrap=True)
        sys.exit(1)
