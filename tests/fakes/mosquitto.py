"""A real mosquitto broker on a free loopback port, with persistence, for end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# Retrying covers the window between probing a free port and mosquitto binding it.
PORT_ATTEMPTS = 5
_POLL_INTERVAL = 0.02
_ADDRESS_IN_USE = "Address already in use"
# Logged by mosquitto 2.x once every listener is bound.
_RUNNING_MARK = " running"


class MosquittoError(RuntimeError):
    """The broker could not be started or stopped; the message carries its log."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary (Debian installs it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise MosquittoError("mosquitto not found: install it (apt-get install mosquitto)")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Mosquitto:
    """A mosquitto process on 127.0.0.1 whose data survives stop/start and restart.

    ``stop()`` keeps the port and the persistence directory so a later ``start()`` resumes the
    same broker; leaving the ``async with`` block (or ``aclose()``) also deletes the directory.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        username: str | None = None,
        password: str | None = None,
        allow_anonymous: bool | None = None,
        extra_config: tuple[str, ...] = (),
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("username and password go together")
        self._port = port
        self._port_chosen = port != 0
        self.username = username
        self.password = password
        self.allow_anonymous = username is None if allow_anonymous is None else allow_anonymous
        self.extra_config = extra_config
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties --------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """Always the loopback address."""
        return HOST

    @property
    def port(self) -> int:
        """The broker's TCP port (0 until the first start)."""
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://{HOST}:{self._port}"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def data_dir(self) -> Path:
        """Temp dir with config, password file, log and persistence db (made on first use)."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="mosquitto-"))
        return self._dir

    @property
    def log_path(self) -> Path:
        """mosquitto's log (stderr) across every start."""
        return self.data_dir / "mosquitto.log"

    def log_text(self) -> str:
        """Everything mosquitto logged so far."""
        if self._dir is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        if self.running:
            raise MosquittoError(f"mosquitto already running on port {self._port}")
        await self._write_password_file()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            if not self._port_chosen:
                self._port = free_port()
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn()
            try:
                await self._wait_ready(log_start)
            except MosquittoError:
                await self._signal(signal.SIGTERM)
                log = self.log_text()[log_start:]
                if _ADDRESS_IN_USE in log and attempt < PORT_ATTEMPTS:
                    # A fixed port may still be held briefly; a probed one was taken meanwhile.
                    await asyncio.sleep(_POLL_INTERVAL * attempt)
                    continue
                raise
            self._port_chosen = True
            return

    async def stop(self) -> None:
        """SIGTERM the broker (it saves its persistence database) and wait for it to exit."""
        await self._signal(signal.SIGTERM)

    async def kill(self) -> None:
        """SIGKILL the broker, as a crash: nothing since the last save is persisted."""
        await self._signal(signal.SIGKILL)

    async def restart(self) -> None:
        """Stop cleanly and start again on the same port with the same data."""
        await self.stop()
        await self.start()

    async def aclose(self) -> None:
        """Stop the broker and delete its data directory."""
        try:
            await self.stop()
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- internals ---------------------------------------------------------------------------

    async def _write_password_file(self) -> None:
        if self.username is None or self.password is None:
            return
        path = self.data_dir / "passwd"
        if path.exists():
            return
        passwd_tool = shutil.which("mosquitto_passwd") or shutil.which(
            "mosquitto_passwd", path="/usr/sbin:/usr/local/sbin"
        )
        if passwd_tool is None:
            raise MosquittoError("mosquitto_passwd not found: install the mosquitto package")
        proc = await asyncio.create_subprocess_exec(
            passwd_tool,
            "-b",
            "-c",
            str(path),
            self.username,
            self.password,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            raise MosquittoError(f"mosquitto_passwd failed: {output.decode(errors='replace')}")
        path.chmod(0o600)

    def _config(self) -> str:
        lines = [
            f"listener {self._port} {HOST}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "persistence true",
            f"persistence_location {self.data_dir}{os.sep}",
            "persistence_file mosquitto.db",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.getuid() == 0:
            # As root mosquitto would switch to user "mosquitto", who cannot write our dir.
            lines.append("user root")
        if self.username is not None:
            lines.append(f"password_file {self.data_dir / 'passwd'}")
        lines.extend(self.extra_config)
        return "\n".join(lines) + "\n"

    def _spawn(self) -> None:
        config_path = self.data_dir / "mosquitto.conf"
        config_path.write_text(self._config())
        # The child keeps its own copy of the log descriptor; ours closes right away.
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed binary, our own arguments
                [find_mosquitto(), "-c", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    async def _wait_ready(self, log_start: int) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise MosquittoError(
                    f"mosquitto exited with {proc.returncode} on port {self._port}:\n"
                    + self.log_text()[log_start:]
                )
            # The log line proves our process owns the port, not some other listener.
            if _RUNNING_MARK in self.log_text()[log_start:] and await self._accepts():
                return
            await asyncio.sleep(_POLL_INTERVAL)
        raise MosquittoError(
            f"mosquitto did not accept connections on port {self._port} within "
            f"{START_TIMEOUT}s:\n" + self.log_text()[log_start:]
        )

    async def _accepts(self) -> bool:
        try:
            async with asyncio.timeout(0.5):
                _, writer = await asyncio.open_connection(HOST, self._port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def _signal(self, signum: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)
        await self._reap()

    async def _reap(self) -> None:
        """Wait for the process to exit (SIGKILL after the timeout) and forget it."""
        proc = self._proc
        if proc is None:
            return
        try:
            await asyncio.to_thread(proc.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        self._proc = None
