"""`tuneline ingest introspect|dry-run|commit` with options the command refuses, and locators the CLI
must make absolute before they travel to a service that runs elsewhere. No stack is needed: each is
refused (or rewritten) before anything is published. One line per problem, exit status 2, never a
traceback, never the value given (a DSN put where DSN_ENV goes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import main
from tests.unit.cli_support import run_cli

pytestmark = pytest.mark.usefixtures("cli_data_dir")


ROOT = Path(__file__).resolve().parents[2]




@pytest.mark.parametrize("command", [["introspect"], ["dry-run"], ["commit", "--target", "t"]])
def test_a_dsn_in_a_pg_locator_is_one_line_without_the_password(capsys, command):
    code, out, err = run_cli(["ingest", *command, "pg:postgresql://ann:hunter2pw@db.example/x?query=select 1"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"tuneline ingest {command[0]}: LOCATOR: Value error, a pg: locator names the environment variable that holds "
        "the DSN (pg:DSN_ENV?query=SQL), never the DSN itself"]
    assert "hunter2pw" not in out + err and "Traceback" not in err


@pytest.mark.parametrize(("argv", "line"), [
    (["introspect", "jsonl:x.jsonl", "--sample-size", "0"],
     "tuneline ingest introspect: --sample-size: Input should be greater than or equal to 1"),
    (["dry-run", "jsonl:x.jsonl", "--sample-size", "1000"],
     "tuneline ingest dry-run: --sample-size: Input should be less than or equal to 100"),
    (["commit", "jsonl:x.jsonl", "--target", "no spaces!"],
     "tuneline ingest commit: --target: String should match pattern '^[A-Za-z0-9_-]+$'"),
])
def test_an_option_out_of_range_names_the_option(capsys, argv, line):
    code, _, err = run_cli(["ingest", *argv], capsys)
    assert code == 2 and err.strip().splitlines() == [line]


def test_a_map_that_is_not_json_is_a_message_not_a_traceback(capsys):
    code, _, _ = run_cli(["ingest", "dry-run", "jsonl:x.jsonl", "--map", "{text: body}"], capsys)
    assert str(code).startswith("--map: not a JSON object (")  # SystemExit's message: printed, exit status 1


def test_a_relative_hf_directory_is_made_absolute_like_a_file_path(tmp_path, monkeypatch):
    # the ingest service resolves paths in its own working directory (the repository), not the user's
    (tmp_path / "saved ds").mkdir()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main.absolute_locator("hf:./saved ds:train") == f"hf:{tmp_path}/saved ds:train"
    assert main.absolute_locator("hf:sub:train:v1") == f"hf:{tmp_path}/sub:train:v1"  # a directory here
    assert main.absolute_locator("hf:..:test") == f"hf:{tmp_path.parent}:test"
    for unchanged in ("hf:PolyAI/banking77:train", "hf:imdb:train", "hf:/data/ds:train", "hf:~/ds:train"):
        assert main.absolute_locator(unchanged) == unchanged


def test_a_closed_pipe_ends_the_command_quietly():
    # `tuneline recipes | head -1`: the reader is gone before the command writes
    proc = subprocess.Popen([sys.executable, "-c", "from services.cli.main import entry; entry()", "recipes"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err
