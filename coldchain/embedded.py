"""Embedded PostgreSQL and MQTT broker for `coldchain demo` and the test suite on a machine
that has neither, and for fault tests that must kill and restart a real server.

PostgreSQL comes from the `pgserver` wheel, which bundles the server binaries; it listens on a
free loopback port. When run as root the server runs as an unprivileged system user (PostgreSQL
refuses to run as root). The broker is Mosquitto when its binary is installed (persistent, as in
production) and otherwise amqtt, a pure-Python broker from PyPI.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

_PG_SYSTEM_USER: Final = "coldchain-pg"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(
    port: int, timeout: float, process: subprocess.Popen[bytes] | None = None, what: str = "server"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


class EmbeddedPostgres:
    """A private PostgreSQL cluster in `data_dir`, started, stopped and killed on demand."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        with warnings.catch_warnings():
            # pgserver asks platformdirs for a runtime dir at import; XDG_RUNTIME_DIR is often
            # unset on servers, and the fallback is fine for us (we do not use that dir).
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            from pgserver._commands import POSTGRES_BIN_PATH

        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self._bin = Path(POSTGRES_BIN_PATH)
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = _PG_SYSTEM_USER
            self._prepare_for_system_user()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _prepare_for_system_user(self) -> None:
        import stat

        from pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(_PG_SYSTEM_USER)
        ensure_prefix_permissions(self._bin)
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(self._bin, stat.S_IXGRP | stat.S_IXOTH | read)
        ensure_folder_permissions(self._bin.parent / "lib", read)
        ensure_folder_permissions(self._bin.parent / "share", read)

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(self._bin / args[0]), *args[1:]]
        result = subprocess.run(  # noqa: S603 - a bundled PostgreSQL binary, our own arguments
            command, user=self._user, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )

    def start(self) -> str:
        """Initialise the cluster if new, start it, and return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            import pwd

            from pgserver.utils import ensure_prefix_permissions

            entry = pwd.getpwnam(self._user)
            ensure_prefix_permissions(self.data_dir)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--no-sync",
            )
            with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
                conf.write(
                    "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                    "max_connections = 100\nshared_buffers = 128MB\n"
                )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.data_dir / "server.log"),
            "-o",
            f"-p {self.port}",
            "start",
        )
        logger.info("embedded PostgreSQL listening on 127.0.0.1:%d", self.port)
        return self.url

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            if self._user is not None:
                from pgserver.utils import ensure_prefix_permissions

                ensure_prefix_permissions(self.data_dir)  # a parent may have been re-created
            self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-m", "fast", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would."""
        pid_file = self.data_dir / "postmaster.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)

    def destroy(self) -> None:
        """Stop the server (killing it if it will not stop) and delete its data."""
        try:
            self.stop()
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            logger.warning("embedded PostgreSQL in %s did not stop; killing it", self.data_dir)
            self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )


# As deploy/mosquitto/mosquitto.conf: a crash of the broker loses at most this long of what it
# had queued.
AUTOSAVE_S: Final = 10
MOSQUITTO_CONF: Final = """\
# Written by coldchain for an embedded broker. Persistent sessions keep their queued QoS 1
# messages across a restart of the broker.
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {data_dir}/
autosave_interval {autosave_s}
max_queued_messages 1000000
max_inflight_messages 0
max_packet_size 1048576
log_dest file {data_dir}/mosquitto.log
log_type error
log_type warning
log_type notice
"""

AMQTT_CONF: Final = """\
listeners:
  default:
    type: tcp
    bind: 127.0.0.1:{port}
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: true
"""


class EmbeddedBroker:
    """A private MQTT broker on a free loopback port: Mosquitto if installed, else amqtt."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        prefer: str | None = None,
        autosave_s: int = AUTOSAVE_S,
    ) -> None:
        """`autosave_s`: how often Mosquitto writes its sessions and queued messages to disk.
        Each save stops the broker while it writes, which under tens of thousands of messages
        a second is a few hundred milliseconds (`docs/alarms.md`)."""
        self.data_dir = data_dir.resolve()
        self.autosave_s = autosave_s
        self.port = port or free_port()
        binary = mosquitto_binary()
        self.kind = prefer or ("mosquitto" if binary else "amqtt")
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / f"{self.kind}.out").open("ab")
        if self.kind == "mosquitto":
            if self._binary is None:
                raise RuntimeError("mosquitto is not installed")
            conf = self.data_dir / "mosquitto.conf"
            conf.write_text(
                MOSQUITTO_CONF.format(
                    port=self.port, data_dir=self.data_dir, autosave_s=self.autosave_s
                )
                + ("user root\n" if os.geteuid() == 0 else ""),
                encoding="utf-8",
            )
            command = [self._binary, "-c", str(conf)]
        else:
            conf = self.data_dir / "amqtt.yaml"
            conf.write_text(AMQTT_CONF.format(port=self.port), encoding="utf-8")
            amqtt = Path(sys.executable).with_name("amqtt")
            command = [str(amqtt), "-c", str(conf)]
        self._process = subprocess.Popen(  # noqa: S603 - the broker binary, our own config
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own session: a Ctrl-C at the terminal reaches us, and we stop the broker
            # after the service has let go of it, not before.
            start_new_session=True,
        )
        log.close()
        wait_for_port(self.port, 20, self._process, what=self.kind)
        logger.info("embedded %s listening on 127.0.0.1:%d", self.kind, self.port)
        return self.url

    def stop(self) -> None:
        """Stop gracefully (Mosquitto saves its persistence file)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()
