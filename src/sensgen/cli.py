"""The `sensgen` command line: the only module that parses argv.

Each command calls one library function. Exit codes: 0 ok; 2 bad input (study file,
dataset, argument), with a one-paragraph message naming what is wrong and the fix; 1 an
internal error (a bug: please report it with the traceback); `run` stopped by Ctrl-C
exits 130, by SIGTERM 143 (`Terminated`), finished packs kept.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sensgen.errors import UserError

app = typer.Typer(
    name="sensgen",
    help="Sensitivity and generalization in neural networks (Novak et al., ICLR 2018).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
datasets_app = typer.Typer(help="List, fetch and verify datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")

out_console = Console()
err_console = Console(stderr=True)


def _parse_sets(assignments: list[str]) -> dict[str, str]:
    overrides = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r} is not KEY=VALUE; write e.g. --set grid.seed=[0,1,2].")
        overrides[key.strip()] = value.strip()
    return overrides


@app.command()
def run(
    study: Annotated[str, typer.Argument(help="A study TOML file or a preset name.")],
    out: Annotated[Path | None, typer.Option(help="Study directory (default: runs/NAME).")] = None,
    executor: Annotated[str, typer.Option(help="local | ray (one Ray task per pack)")] = "local",
    workers: Annotated[
        int | None,
        typer.Option(
            help="Packs at once. local: 1 (default) trains in-process, N > 1 in N 1-thread "
            "processes (at most one per CPU, else a warning); ray: CPUs of the local Ray "
            "instance (default: all)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a study key: KEY=VALUE.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Run (or resume) a study, then write its report."""
    from sensgen import study as study_module
    from sensgen.runner import run as run_study

    loaded = study_module.load(study, _parse_sets(set_ or []))
    out_dir = out or Path("runs") / loaded.name
    try:
        with _sigterm_as_interrupt():
            result = run_study(
                loaded, out_dir, executor=executor, workers=workers, device=device,
                progress=progress,
            )  # fmt: skip
    except KeyboardInterrupt as stop:  # (typer would exit 130 without a word)
        terminated = isinstance(stop, Terminated)
        err_console.print(
            f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: finished packs are "
            "kept; run the same command again to resume.",
            markup=False,
        )
        raise typer.Exit(128 + signal.SIGTERM if terminated else 130) from None
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts.items()))
    if result.n_trained == 0 and result.complete:  # (not when a dead worker left packs open)
        out_console.print(
            f"Nothing to do: all {result.n_runs} runs of study {loaded.name!r} in {out_dir} "
            f"are already finished ({counts}).",
            markup=False,  # (a path may hold [brackets])
        )
    else:
        out_console.print(
            f"Trained {result.n_trained} model{'s' * (result.n_trained != 1)} in "
            f"{result.wall_s:.1f} s; study "
            f"{loaded.name!r} in {out_dir}: {counts}.",
            markup=False,
        )
    if result.report is not None:
        out_console.print(f"Report: {result.report}", markup=False)


@app.command()
def status(directory: Annotated[Path, typer.Argument(help="A study directory.")]) -> None:
    """Show done / running / failed / pending per pack, and an ETA."""
    from sensgen.study_dir import study_status

    summary = study_status(directory)
    table = Table(title=escape(f"{directory} ({summary.study_name})"))
    for column in ("pack", "runs", "done", "failed", "diverged", "running", "pending", "status"):
        table.add_column(column)
    for row in summary.packs:
        table.add_row(*(escape(str(v)) for v in row))
    out_console.print(table)
    out_console.print(summary.headline(), markup=False)
    if (note := summary.damage_note()) is not None:
        out_console.print(
            f"[bold yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True
        )


@app.command()
def report(directory: Annotated[Path, typer.Argument(help="A study directory.")]) -> None:
    """Write figures, statistics and report/index.html for a study directory."""
    from sensgen.analysis import write_report
    from sensgen.store import open_results

    open_results(directory).close()  # a clear error if DIR is not a study directory
    out_console.print(f"Report: {write_report(directory)}", markup=False)


@datasets_app.command("list")
def datasets_list() -> None:
    """List the datasets sensgen knows, and whether their files are here."""
    from sensgen import data

    table = Table()
    for column in ("name", "train", "test", "classes", "source", "found at"):
        table.add_column(column)
    for name in data.names():
        info = data.describe(name)
        where = data.locate(name)
        found = str(where) if where else f"— (sensgen datasets fetch {name})"
        unusable = [f for r in data.verify_all(name) for f in r.files if not f.ok and f.present]
        if unusable:  # a status must not hide damage (or a folder this user may not read)
            what = "damaged" if any(f.state == "damaged" for f in unusable) else "unreadable"
            found = f"{str(where) + '; a copy is ' if where else ''}{what.upper()}: "
            found += f"see sensgen datasets verify {name}"
        table.add_row(
            name, str(info.n_train), str(info.n_test), str(info.n_classes), info.source, found
        )
    out_console.print(table)


@datasets_app.command("fetch")
def datasets_fetch(name: Annotated[str, typer.Argument(help="Dataset name.")]) -> None:
    """Download (if needed) and verify a dataset's files."""
    from sensgen import data

    out_console.print(f"{name}: verified files in {data.fetch(name)}", markup=False)


@datasets_app.command("verify")
def datasets_verify(
    name: Annotated[str | None, typer.Argument(help="Dataset name \\[default: all found].")] = None,
) -> None:
    """Check the checksums of a dataset's files (default: every dataset with files here).

    Files here: in the cache, in Debian's folder or in an installed package, damaged or not.

    Exits 2 if any file fails."""
    from sensgen import data

    checked = {n: data.verify_all(n) for n in ([name] if name else data.names())}
    if not name:  # every dataset with a file anywhere on its search path, good or not
        checked = {n: rs for n, rs in checked.items() if any(f.present for f in rs[0].files)}
    for n, reports in checked.items():
        for f in (f for r in reports for f in r.files):
            mark = "ok" if f.ok else f"FAILED: {f.problem}. Fix: {f.fix}."
            out_console.print(f"{n}: {f.path}: {mark}", markup=False, soft_wrap=True)
    if bad := sum(not all(r.ok for r in reports) for reports in checked.values()):
        raise UserError(f"{bad} dataset(s) failed verification; each line above says the fix.")
    if not checked:
        out_console.print("No dataset files found; `sensgen datasets fetch NAME` gets them.")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster scheduler's stop, ``kill``), raised in the main thread as Ctrl-C
    is, so that a run stops the same way: workers stopped, finished packs kept, a word on
    how to resume. Python's default for SIGTERM is to die at once, leaving spawned workers
    to notice they are orphaned and the resource tracker to warn of leaked semaphores."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, the first SIGTERM raises `Terminated`; later ones are ignored,
    so that the stop it started is not itself cut short."""
    signalled = False

    def handler(signum: int, frame: object) -> None:
        nonlocal signalled
        if not signalled:
            signalled = True
            raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an embedding application): leave it be
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """Entry point. Usage errors exit 2 (typer); a `UserError` prints its message, exits 2;
    so does a file the machine will not let sensgen read or write (permissions, a full
    disk: `environment_problem`), which is no bug to report."""
    try:
        app(args=argv, prog_name="sensgen")
    except UserError as err:
        _fail(str(err))
    except Exception as err:
        problem = environment_problem(err)
        if problem is None:
            raise
        _fail(problem)


def environment_problem(err: BaseException) -> str | None:
    """A message for an error of the machine rather than of sensgen, else None: an OSError
    of a refusing machine (permission denied, no space left, not a directory), SQLite's
    read-only or full database, or any error that says the disk is full. Files are
    written to temporaries and renamed, and a run's rows are committed per pack, so what
    was computed before it stays; the message says so."""
    text = str(err)
    if isinstance(err, OSError) and err.errno in _MACHINE_ERRNOS:
        where = f": {err.filename}" if err.filename else ""
        where += f" -> {err.filename2}" if err.filename2 else ""  # (a rename's target)
        what = f"{err.strerror or text}{where}"
    elif isinstance(err, sqlite3.OperationalError) and (
        "readonly" in text or "disk" in text or "unable to open" in text
    ):
        what = f"the study database cannot be written ({text})"
    elif "No space left on device" in text:
        what = f"no space left on device ({type(err).__name__}: {text})"
    else:
        return None
    return (
        f"{what}. Check that the study directory and $SENSGEN_DATA are writable "
        "directories and that the disk has space, then run the command again: what was "
        "already computed is kept."
    )


# What a machine refuses: permissions, a read-only or full file system, a file where a
# folder should be or a folder where a file should be (mkdir(exist_ok=True) of a file's
# name is EEXIST). (Not ENOENT and the like, which may be sensgen's own bug.)
_MACHINE_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}
    | {errno.EISDIR, errno.EEXIST}
)


def _fail(message: str) -> None:
    # escape: messages quote TOML ([grid], [lo, hi]) that rich would read as markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
