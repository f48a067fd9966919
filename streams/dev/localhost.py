"""Ports, processes and private files on this machine: what the local broker needs from the host."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["UMASK", "free_port", "locked", "make_private", "pid_alive", "port_open", "send_signal", "wait_exit"]

# Every process that writes into the data dir: files 0600, directories 0700.
UMASK = 0o077


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int) -> bool:
    """True when the process runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own exited child not yet reaped) is not alive.
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/stat").read_text()
        if status.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def send_signal(pid: int, sig: signal.Signals) -> None:
    """Signal the process, if it is still there."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for the process to end; True if it has."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        # Reap it if it is our child (tests start it in-process).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    return not pid_alive(pid)


def make_private(root: Path) -> None:
    """Directories 0700 and files 0600 under ``root`` (symbolic links are left alone)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            with contextlib.suppress(FileNotFoundError):
                mode = path.lstat().st_mode
                if stat.S_ISDIR(mode) and stat.S_IMODE(mode) != 0o700:
                    os.chmod(path, 0o700)
                elif stat.S_ISREG(mode) and stat.S_IMODE(mode) & 0o077:
                    os.chmod(path, stat.S_IMODE(mode) & 0o700)
    os.chmod(root, 0o700)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock (made 0700, with its parents, if missing): one start or stop at a time."""
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.mkdir(mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    fd = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
