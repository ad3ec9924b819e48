"""The ``asyncsentinel`` command line.

* ``asyncsentinel demo`` runs the example shop (FastAPI + SQLAlchemy async) under uvicorn,
  drives traffic at its healthy and misbehaving routes and prints the findings asyncsentinel
  reported; ``--serve`` keeps it up for Prometheus to scrape.
* ``asyncsentinel dashboards --out DIR`` copies the Grafana dashboards, their provisioning files
  and the Prometheus alert rules into DIR.

Exit status: 0 success, 1 the command failed (the message says why), 2 a wrong option.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import sys
from collections.abc import Sequence
from importlib.resources.abc import Traversable
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from asyncsentinel import __version__

PROG = "asyncsentinel"


# --- argument types (argparse turns their errors into a usage message and exit status 2) --------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected a port from 0 to 65535 (0: any free port), got {text!r}"
        )
    return value


def _database_url(text: str) -> str:
    try:
        url = make_url(text)
        backend, shown = url.get_backend_name(), repr(url.render_as_string(hide_password=True))
    except ArgumentError:
        backend, shown = "", "text that is not a URL"
    if backend not in ("postgresql", "sqlite"):
        raise argparse.ArgumentTypeError(
            f"expected a PostgreSQL URL (postgresql://user:password@host:5432/dbname) or a "
            f"SQLite one (sqlite:///path/to/file.db), got {shown}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``asyncsentinel`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="asyncsentinel finds, at run time, the mistakes that take async Python "
        "backends down.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="run the example shop, drive traffic at it and print the findings",
        description="Start the example shop (FastAPI + SQLAlchemy async) under uvicorn, send "
        "traffic to every route, healthy and misbehaving, and print the findings asyncsentinel "
        "reported: kind, route, count and the culprit line.",
    )
    demo.add_argument(
        "--database-url",
        type=_database_url,
        metavar="URL",
        help="run the shop on this PostgreSQL database (postgresql://...) instead of a SQLite "
        "file in a temporary directory; its tables are prefixed shop_",
    )
    demo.add_argument(
        "--requests",
        type=_positive_int,
        default=10,
        metavar="N",
        help="requests per healthy route; misbehaving routes get at most N, slow ones fewer "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--serve",
        action="store_true",
        help="after the report, keep the shop running (for Prometheus to scrape /metrics) "
        "until Ctrl-C",
    )
    demo.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    demo.add_argument(
        "--port", type=_port, default=0, help="port to listen on (default: a free one)"
    )
    demo.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop implementation (default: %(default)s)",
    )

    dashboards = commands.add_parser(
        "dashboards",
        help="copy the Grafana dashboards and Prometheus alert rules into a directory",
        description="Copy asyncsentinel's Grafana dashboards (JSON), their Grafana provisioning "
        "files and the Prometheus alert rules into a directory.",
    )
    dashboards.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="directory to copy into"
    )
    dashboards.add_argument(
        "--force", action="store_true", help="overwrite files that already exist in DIR"
    )
    return parser


# --- dashboards ----------------------------------------------------------------------------------
def dashboards_source() -> Traversable | None:
    """The packaged ``dashboards`` directory (wheel), else the source checkout's, else ``None``."""
    packaged = importlib.resources.files("asyncsentinel").joinpath("dashboards")
    if packaged.is_dir():
        return packaged
    # A source checkout (editable install): src/asyncsentinel/cli.py -> <repo>/dashboards.
    checkout = Path(__file__).resolve().parents[2] / "dashboards"
    if checkout.is_dir() and (checkout.parent / "pyproject.toml").is_file():
        return checkout
    return None


def _files(
    root: Traversable, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], Traversable]]:
    """Every file under *root* as (relative path parts, file); hidden files and caches skipped."""
    found: list[tuple[tuple[str, ...], Traversable]] = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        if entry.is_dir():
            found.extend(_files(entry, (*prefix, entry.name)))
        elif entry.is_file() and not entry.name.endswith((".py", ".pyc")):
            found.append(((*prefix, entry.name), entry))
    return found


class CommandError(Exception):
    """A command failed for a reason its message explains (exit status 1)."""


def copy_dashboards(out: Path, *, force: bool = False) -> list[Path]:
    """Copy the dashboards into *out*; returns the files written."""
    source = dashboards_source()
    if source is None:
        raise CommandError(
            "the dashboards are not installed with this copy of asyncsentinel; reinstall it from "
            "a wheel or run the command from a clone of the repository"
        )
    files = _files(source)
    if not files:
        raise CommandError(f"no dashboard files found in {source}")
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: exists and is not a directory")
    targets = [(out.joinpath(*parts), entry) for parts, entry in files]
    existing = [t for t, _ in targets if t.exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise CommandError(f"would overwrite {len(existing)} file(s) ({names}); pass --force")
    written = []
    for target, entry in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(entry.read_bytes())
        written.append(target)
    return written


# --- entry point ---------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from asyncsentinel.demo import DemoError, missing_requirements

    missing = missing_requirements()
    if missing:
        raise CommandError(
            f"the demo needs {', '.join(missing)}: pip install 'asyncsentinel[demo]'"
        )
    from asyncsentinel.demo.runner import DemoOptions, run

    options = DemoOptions(
        database_url=args.database_url,
        host=args.host,
        port=args.port,
        requests=args.requests,
        serve=args.serve,
        loop=args.loop,
    )
    if options.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise CommandError("--loop uvloop: uvloop is not installed (pip install uvloop)")
    try:
        return run(options)
    except DemoError as exc:
        raise CommandError(str(exc)) from None


def _dashboards(args: argparse.Namespace) -> int:
    written = copy_dashboards(args.out, force=args.force)
    for path in written:
        print(path)
    print(f"Copied {len(written)} files into {args.out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler = {"demo": _demo, "dashboards": _dashboards}[args.command]
    try:
        return handler(args)
    except CommandError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
