"""What reaches a log is JSON: no progress bars in a service's log, JSON from the CLI's own events."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _run(code: str, **env) -> subprocess.CompletedProcess:
    clean_env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env, timeout=120)


def test_a_service_turns_off_the_progress_bars_that_would_put_non_json_lines_in_its_log():
    out = _run("from services.common.logging import configure_logging\n"
               "configure_logging('trainer')\n"
               "import transformers\n"
               "print(transformers.utils.logging.is_progress_bar_enabled())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_cli_logs_its_own_events_as_json_on_stderr():
    out = _run("import sys\nsys.argv = ['tuneline', 'recipes']\n"
               "from services.cli.main import entry\n"
               "from services.common.logging import get_logger\n"
               "import services.cli.main as m\n"
               "m.cmd_recipes = lambda args: get_logger('x').warning('probe_event', answer=42) or 0\n"
               "entry()", TUNELINE_LOG_LEVEL="INFO")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["service"] == "cli" for line in lines), out.stderr
    assert any(json.loads(line)["event"] == "probe_event" for line in lines)


def test_library_logs_warnings_uncaught_errors_and_url_passwords_come_out_as_redacted_json():
    out = _run("import logging\n"
               "from services.common.logging import configure_logging, get_logger\n"
               "configure_logging('registry')\n"
               "get_logger('t').info('service_started', nats_url='nats://user:S3cretPw@127.0.0.1:4222')\n"
               "logging.getLogger('openai').warning('HTTP Request: GET https://x/v1/fine_tuning/jobs')\n"
               "import warnings\nwarnings.warn('XDG_RUNTIME_DIR is not set', RuntimeWarning)\n"
               "raise RuntimeError('cannot start')\n")
    lines = [json.loads(line) for line in out.stderr.splitlines() if line.strip()]  # every line is JSON
    assert "S3cretPw" not in out.stderr and lines[0]["nats_url"] == "nats://user:***@127.0.0.1:4222"
    assert lines[1]["logger"] == "openai" and lines[1]["service"] == "registry"
    assert lines[2]["logger"] == "py.warnings" and "XDG_RUNTIME_DIR" in lines[2]["event"]  # a library's warning
    assert lines[3]["event"] == "uncaught_exception" and "cannot start" in lines[3]["exception"]
