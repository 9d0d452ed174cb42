"""The Typer app and what every command shares: one-line errors, progress output, JSON printing, common options.

Every error a user can cause — a bad option value, a missing file, a malformed config — prints one ``error:``
line on stderr and exits 1; no traceback, no usage box. Anything else is a bug: one ``internal error:`` line and
exit 2 (``SKIPTOOL_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from ..errors import SkipToolError

console = Console()
err_console = Console(stderr=True)
DEMO = "smollm2-135m"
PhaseProgress = Callable[[str, int, int], None]


def fail_line(kind: str, message: str) -> None:
    err_console.print(f"[bold red]{kind}:[/] {escape(message)}", highlight=False, soft_wrap=True)


# Click's usage errors: click's ClickException, or the copy of click that typer >= 0.29 vendors
CLICK_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineErrors(TyperGroup):
    """A command group that reports every error as one line (see the module docstring)."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            fail_line("error", "interrupted")
            code = 130
        except CLICK_ERRORS as exc:
            fail_line("error", f"{exc.format_message()} (see `skiptool --help`)")
            code = 1
        except SkipToolError as exc:
            fail_line("error", str(exc))
            code = 1
        except KeyboardInterrupt:
            fail_line("error", "interrupted")
            code = 130
        except Exception as exc:  # noqa: BLE001 - the last resort: a bug, reported in one line
            if os.environ.get("SKIPTOOL_DEBUG"):
                raise
            fail_line("internal error", f"{type(exc).__name__}: {exc} (set SKIPTOOL_DEBUG=1 for a traceback)")
            code = 2
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        """Run the command; Ctrl-C is one ``error:`` line saying what the command kept (its message), exit 130
        (typer would exit 130 silently)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            fail_line("error", str(exc) or "interrupted")
            raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        console.out(f"skiptool {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="skiptool",
    cls=OneLineErrors,
    help="Adaptive FFN skipping for decoder-only LLMs: calibrate, train routers, export, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Adaptive FFN skipping for decoder-only LLMs: calibrate, train routers, export, benchmark."""


ModelArg = typer.Argument(DEMO, help="HF model id, local HF directory, .gguf file, 'smollm2-135m' (built-in demo), "
                          "or random:SHAPE / random:CONFIG.json (random weights of shape tiny, demo, 1b or 8b or of "
                          "a Llama-shaped config, no tokenizer: for bench and info).")
DeviceOpt = typer.Option("cpu", "--device", help="cpu or cuda.")
DtypeOpt = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default: fp32 on the CPU, bf16 on CUDA).")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")


def output_path(value: str) -> Path:
    """Parse an output path: an empty one is a mistake (``Path("")`` is the current folder), not a place to write."""
    if not str(value).strip():
        raise typer.BadParameter("is empty; name a file or folder to write")
    return Path(value)


OUTPUT = {"parser": output_path, "metavar": "<path>"}  # typer.Option(..., **OUTPUT) for every path a command writes
DataOpt = typer.Option("builtin:wikitext2-sample", "--data", help="Text file, JSONL file, HF dataset name, or the "
                       "built-in WikiText-2 excerpt.")
FieldOpt = typer.Option("text", "--field", help="Text field of JSONL records / dataset rows.")
SplitOpt = typer.Option("test", "--split", help="Hugging Face dataset split.")


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def data_spec(data: str, field: str, split: str, part: str) -> Any:
    from ..data import DataSpec, parse_part

    return DataSpec(source=data, field=field, split=split, part=parse_part(part))


@contextmanager
def phase_progress() -> Iterator[PhaseProgress]:
    """Progress of long work, yielding ``update(label, done, total)`` (``total`` 0: no count).

    A label may end in details in parentheses that change as the work goes, e.g. ``"train routers (loss 0.12,
    41 tok/s)"``: the part before `` (`` names the phase. On a terminal: a rich progress bar per phase, on stderr.
    Elsewhere (logs, CI): one plain line per phase start and end and at most one every 30 seconds in between, with
    the elapsed time.
    """
    if err_console.is_terminal:
        with _rich_progress() as update:
            yield update
    else:
        yield _LineProgress()


@contextmanager
def _rich_progress() -> Iterator[PhaseProgress]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def update(label: str, done: int, total: int) -> None:
            phase = phase_of(label)
            if phase not in tasks:
                tasks[phase] = progress.add_task(label, total=total or None)
            progress.update(tasks[phase], description=label, completed=done, total=total or None)

        yield update


class _LineProgress:
    """Plain progress lines for logs (see :func:`phase_progress`)."""

    INTERVAL_S = 30.0

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.phase: str | None = None
        self.last = 0.0

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        finished = bool(total) and done >= total
        if phase_of(label) != self.phase or finished or now - self.last >= self.INTERVAL_S:
            count = f" {done}/{total}" if total else ""
            err_console.print(f"[{now - self.start:6.0f} s] {label}{count}", highlight=False, soft_wrap=True)
            self.phase, self.last = phase_of(label), now


def phase_of(label: str) -> str:
    """The phase a progress label names: the label without its trailing details in parentheses."""
    return label.split(" (", 1)[0]


def phase_names(update: PhaseProgress) -> Callable[[str], None]:
    """A ``say(phase)`` for work that reports named phases without counts (export)."""
    return lambda phase: update(phase, 0, 0)


def wrote(paths: Any) -> None:
    for path in paths:
        console.print(f"[dim]wrote {path}[/]", soft_wrap=True)
