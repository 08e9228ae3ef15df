"""The command line as a person runs it: a process, its exit status and what it prints."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

pytestmark = pytest.mark.postgres

COLDCHAIN = str(Path(sys.executable).with_name("coldchain"))


def run_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLDCHAIN_DATABASE_URL=database_url)
    return subprocess.run(
        [COLDCHAIN, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def elsewhere(url: str, *, user: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}@{parts.hostname}:{parts.port or 5432}"
    path = f"/{database}" if database is not None else parts.path
    return urlunsplit(parts._replace(netloc=netloc, path=path))


@pytest.mark.parametrize(
    "command",
    [["migrate"], ["token", "create", "--role", "viewer", "--name", "ci"]],
    ids=["migrate", "token create"],
)
def test_a_database_that_does_not_exist_is_one_line_not_a_traceback(
    server_database_url: str, command: list[str]
) -> None:
    missing = f"coldchain_missing_{uuid.uuid4().hex[:8]}"
    result = run_cli(elsewhere(server_database_url, database=missing), *command)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"coldchain {command[0]}: ")
    assert f'database "{missing}" does not exist' in line


def test_a_role_postgresql_refuses_is_one_line_without_the_password(
    server_database_url: str,
) -> None:
    user = f"nobody_{uuid.uuid4().hex[:8]}"
    url = elsewhere(server_database_url, user=f"{user}:s3cret-pass")
    result = run_cli(url, "migrate")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("coldchain migrate: ") and user in line
    assert "s3cret-pass" not in result.stderr + result.stdout
