"""Running `tuneline` in-process, for the tests of its error paths (with the `cli_data_dir` fixture)."""

from __future__ import annotations

import pytest

from services.cli import main


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """`tuneline ARGV` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main.main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err
