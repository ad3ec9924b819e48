"""The ``asyncsentinel`` command line: usage errors, ``dashboards --out``, demo settings."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from asyncsentinel import __version__
from asyncsentinel.cli import dashboards_source, main
from asyncsentinel.config import Settings
from asyncsentinel.demo.runner import DEMO_SETTINGS, sentinel_options

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["demo", "--requests", "0"], "argument --requests: expected a whole number >= 1"),
        (["demo", "--requests", "many"], "argument --requests: expected a whole number >= 1"),
        (["demo", "--port", "70000"], "argument --port: expected a port from 0 to 65535"),
        (["demo", "--loop", "trio"], "argument --loop: invalid choice: 'trio'"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (
            ["demo", "--database-url", "mysql://shop:hunter2@db/shop"],
            "argument --database-url: expected a PostgreSQL URL",
        ),
        (["dashboards"], "the following arguments are required: --out"),
    ],
)
def test_a_bad_option_exits_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "usage: asyncsentinel" in err
    assert message in err


def test_a_bad_database_url_is_not_echoed_with_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--database-url", "mysql://shop:hunter2@db/shop"])
    err = capsys.readouterr().err
    assert "hunter2" not in err
    assert "mysql://shop:***@db/shop" in err


def test_the_installed_command_exits_2_on_a_bad_option() -> None:
    # The real process, as a user runs it: python -m asyncsentinel (same entry point as the
    # console script declared in pyproject.toml).
    result = subprocess.run(
        [sys.executable, "-m", "asyncsentinel", "demo", "--requests", "-3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "asyncsentinel demo: error: argument --requests" in result.stderr
    assert result.stdout == ""


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"asyncsentinel {__version__}"


# --- dashboards ---------------------------------------------------------------------------------
def _shipped_files() -> dict[str, bytes]:
    """What ``dashboards --out`` must copy: the checkout's dashboards/, minus hidden files and
    the Python that generates them."""
    root = REPO / "dashboards"
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and not any(part.startswith(".") or part == "__pycache__" for part in path.parts)
        and path.suffix not in (".py", ".pyc")
    }


def _copied_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_dashboards_source_is_the_checkouts_dashboards_directory() -> None:
    source = dashboards_source()
    assert source is not None
    assert Path(str(source)).resolve() == (REPO / "dashboards").resolve()


def test_dashboards_out_copies_every_dashboard_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "monitoring" / "asyncsentinel"  # created, parents included

    assert main(["dashboards", "--out", str(out)]) == 0

    expected = _shipped_files()
    assert expected, "dashboards/ holds no files to ship"
    assert _copied_files(out) == expected  # same names, same bytes, nothing else
    grafana = [name for name in expected if name.endswith(".json")]
    assert grafana, "no Grafana dashboard JSON was copied"
    for name in grafana:
        json.loads((out / name).read_text())
    printed = capsys.readouterr()
    assert sorted(printed.out.split()) == sorted(str(out / name) for name in expected)
    assert f"Copied {len(expected)} files into {out}" in printed.err


def test_dashboards_out_refuses_to_overwrite_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dashboards", "--out", str(tmp_path)]) == 0
    name = sorted(_shipped_files())[0]
    (tmp_path / name).write_text("edited by hand")
    capsys.readouterr()

    assert main(["dashboards", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "asyncsentinel dashboards: error: would overwrite" in err
    assert "pass --force" in err
    assert (tmp_path / name).read_text() == "edited by hand"

    assert main(["dashboards", "--out", str(tmp_path), "--force"]) == 0
    assert _copied_files(tmp_path) == _shipped_files()


def test_dashboards_out_that_is_a_file_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "taken"
    target.write_text("")
    assert main(["dashboards", "--out", str(target)]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err


# --- demo settings ------------------------------------------------------------------------------
def test_demo_settings_yield_to_the_environment() -> None:
    assert sentinel_options({}) == DEMO_SETTINGS
    chosen = sentinel_options({"ASYNCSENTINEL_SLOW_QUERY_SECONDS": "2"})
    assert "slow_query_seconds" not in chosen
    assert chosen == {k: v for k, v in DEMO_SETTINGS.items() if k != "slow_query_seconds"}
    assert set(DEMO_SETTINGS) <= set(Settings.names())


def test_demo_on_a_port_in_use_fails_with_a_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "asyncsentinel", "demo", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"asyncsentinel demo: error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "choose another --port" in result.stderr


def test_in_the_package_only_the_demo_shop_counts_as_user_code() -> None:
    # Culprits are the innermost user-code frame; the demo runner wraps every request of the
    # shop, so it must not be mistaken for the application.
    import asyncsentinel.demo.runner as runner
    from asyncsentinel.frames import is_user_code

    package_demo = Path(runner.__file__).parent
    assert not is_user_code(runner.__file__)
    assert is_user_code(str(package_demo / "shop" / "bad.py"))  # the wheel's copy of the shop
    assert is_user_code(str(REPO / "examples" / "shop" / "bad.py"))
