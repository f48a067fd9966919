"""The gateway's usage spool: a write-ahead log of usage events, deleted once the broker acknowledged them.

Every usage event is appended to the active segment (one ``write(2)``, so a
process killed at any moment loses nothing it accepted) before the publisher
buffers it. Every ``FSYNC_INTERVAL_S`` the spool fsyncs what was written (the
file, and the directory for a new segment's entry), so a machine crash loses
at most that much. A segment is sealed at ``segment_bytes`` or after
``SEGMENT_AGE_S``; a sealed segment is deleted only when every event in it was
acknowledged by the broker; otherwise, once none of its events is in flight,
it is read back and sent again (the aggregate's dedupe makes a second copy
harmless). A process never appends to a segment it did not create, and a line
that does not parse (a write torn by a crash) is skipped, counted and logged:
reading goes on.

::

    segment = spool.append(topic, key, value)   # in flight
    spool.resolve(segment, delivered=True)      # acknowledged (False: send it again later)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from budgetflow.schemas.errors import BudgetflowError, ConfigError, InvalidEvent
from budgetflow.schemas.serde import dumps, loads

__all__ = ["FSYNC_INTERVAL_S", "SEGMENT_AGE_S", "Segment", "Spool", "SpoolFull", "SpooledEvent"]

log = logging.getLogger(__name__)

FSYNC_INTERVAL_S = 0.05  # group commit: a machine crash loses at most this much usage
SEGMENT_AGE_S = 1.0  # an acknowledged segment is deleted this long after its first event at most
_PATTERN = "spool-*.jsonl"


class SpoolFull(BudgetflowError):
    """The usage spool cannot take an event: the broker has been away too long, or the disk refused the write."""


class SpooledEvent(NamedTuple):
    """One usage event as it is sent: topic, key and value."""

    topic: str
    key: bytes
    value: bytes


@dataclass(eq=False)
class Segment:
    """One spool file and what is known of its events."""

    path: Path
    size: int
    created: float  # time.monotonic() when opened
    fd: int | None = None  # open while written to, until its data is fsynced
    outstanding: int = 0  # events of it in memory or in flight
    unsent: bool = False  # some event of it must be read back and sent again
    sealed: bool = False  # nothing more is appended to it
    dirty: bool = False  # written since the last fsync
    new: bool = False  # its directory entry is not fsynced yet
    deleted: bool = False


class Spool:
    """Usage events in JSON-lines segment files under ``directory``, bounded by ``max_bytes``."""

    def __init__(self, directory: Path, max_bytes: int, *, segment_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or min(1 << 20, max(4096, max_bytes // 16))
        self.lines_skipped = 0
        self._lock = threading.Lock()  # segment state (the publisher's loop thread and the fsync thread)
        self._sync_lock = threading.Lock()  # one fsync pass at a time, and close() after it
        self._dir_fd: int | None = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._dir_fd)
            raise ConfigError(
                f"usage spool {self.directory} is in use by another publisher; give each gateway process "
                "its own spool dir (DATA_DIR)"
            ) from exc
        for sending in self.directory.glob("spool-*.sending"):  # left by an older version mid-replay
            sending.rename(sending.with_suffix(".jsonl"))
        # What is on disk now was written by a process that is gone: all of it is sent again.
        self._segments = [
            Segment(p, p.stat().st_size, 0.0, unsent=True, sealed=True) for p in sorted(self.directory.glob(_PATTERN))
        ]
        self._bytes = sum(s.size for s in self._segments)
        self._open: list[Segment] = []  # segments whose file is still open (written, or not yet fsynced)
        self._active: Segment | None = None
        self._count = 0

    # -- writing ------------------------------------------------------------------------------
    def append(self, topic: str, key: bytes, value: bytes) -> Segment:
        """Write one event ahead; it counts as in flight until :meth:`resolve`. Raises :class:`SpoolFull`."""
        line = dumps({"topic": topic, "key": key.decode(), "value": value.decode()}) + b"\n"
        with self._lock:
            if self._bytes + len(line) > self.max_bytes:
                raise SpoolFull(f"usage spool {self.directory} is full ({self.max_bytes} bytes)")
            segment = self._active
            if segment is None or segment.size >= self.segment_bytes:
                if segment is not None:
                    self._seal(segment)
                segment = self._new_segment()
            assert segment.fd is not None
            try:
                _write_all(segment.fd, line)
            except OSError as exc:
                # A partial line may be on disk: nothing more goes after it, and reading will skip it.
                self._seal(segment)
                raise SpoolFull(f"usage spool {self.directory} cannot be written: {exc.strerror}") from exc
            segment.size += len(line)
            self._bytes += len(line)
            segment.dirty = True
            segment.outstanding += 1
            return segment

    def _new_segment(self) -> Segment:
        self._count += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        path = self.directory / f"spool-{stamp}-{os.getpid()}-{self._count:06d}.jsonl"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except OSError as exc:
            raise SpoolFull(f"usage spool {self.directory} cannot be written: {exc.strerror}") from exc
        segment = Segment(path, 0, time.monotonic(), fd=fd, new=True)
        self._segments.append(segment)
        self._open.append(segment)
        self._active = segment
        return segment

    def _seal(self, segment: Segment) -> None:
        segment.sealed = True
        if self._active is segment:
            self._active = None
        self._settle(segment)

    def tick(self, now: float | None = None) -> None:
        """Seal the active segment once it is ``SEGMENT_AGE_S`` old, so that acknowledged events leave the disk."""
        moment = time.monotonic() if now is None else now
        with self._lock:
            active = self._active
            if active is not None and moment - active.created >= SEGMENT_AGE_S:
                self._seal(active)

    # -- acknowledgements ---------------------------------------------------------------------
    def resolve(self, segment: Segment, *, delivered: bool) -> None:
        """One event of ``segment`` left memory: acknowledged by the broker, or not (then it is sent again)."""
        with self._lock:
            segment.outstanding -= 1
            if not delivered:
                segment.unsent = True
            self._settle(segment)

    def hold(self, segment: Segment) -> None:
        """One more event of ``segment`` goes in flight (a replay)."""
        with self._lock:
            segment.outstanding += 1

    def _settle(self, segment: Segment) -> None:
        # Ack before delete: a segment goes only when it is sealed and every event in it was acknowledged.
        if segment.sealed and segment.outstanding == 0 and not segment.unsent and not segment.deleted:
            segment.deleted = True
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()
            self._segments.remove(segment)
            self._bytes -= segment.size

    # -- replay -------------------------------------------------------------------------------
    def next_unsent(self) -> Segment | None:
        """The oldest sealed segment with events to send again and none in flight."""
        with self._lock:
            return next((s for s in self._segments if s.sealed and s.unsent and s.outstanding == 0), None)

    def read(self, segment: Segment) -> list[SpooledEvent]:
        """The events of a segment to send again; it stays held (not deleted) until :meth:`resolve` is called once
        more than :meth:`hold` was. Lines that do not parse are skipped, counted and logged."""
        with self._lock:
            segment.unsent = False
            segment.outstanding += 1
        try:
            data = segment.path.read_bytes()
        except OSError as exc:
            log.error("usage spool: cannot read %s (%s); trying again later", segment.path.name, exc.strerror)
            self.resolve(segment, delivered=False)
            raise
        events, skipped = parse_segment(data)
        for number, torn in skipped:
            where = "last line, torn by a crash" if torn else "a corrupt line"
            log.warning("usage spool: skipped line %d of %s (%s)", number, segment.path.name, where)
        self.lines_skipped += len(skipped)
        return events

    # -- durability ---------------------------------------------------------------------------
    def needs_sync(self) -> bool:
        with self._lock:
            return any(s.dirty or s.new or s.sealed for s in self._open)

    def sync(self) -> None:
        """fsync what was written since the last call (files, then the directory for new entries); close the
        files of sealed segments. Runs in a worker thread; appends go on meanwhile."""
        with self._sync_lock:
            with self._lock:
                todo = list(self._open)
                new_entries = any(s.new for s in todo)
                for segment in todo:
                    segment.dirty = segment.new = False
                sealed = [s for s in todo if s.sealed]
            for segment in todo:
                assert segment.fd is not None
                _fsync(segment.fd, segment.path)
            if new_entries and self._dir_fd is not None:
                _fsync(self._dir_fd, self.directory)
            with self._lock:
                for segment in sealed:
                    if segment.fd is not None and not segment.dirty:
                        os.close(segment.fd)
                        segment.fd = None
                        self._open.remove(segment)

    def size(self) -> int:
        """Bytes of usage in the spool: events in flight, to send again, or acknowledged in the active segment."""
        return self._bytes

    def close(self) -> None:
        """Seal the active segment, fsync, delete what was acknowledged; what was not stays for the next start."""
        with self._lock:
            if self._active is not None:
                self._seal(self._active)
        self.sync()
        with self._sync_lock, self._lock:
            for segment in self._open:
                if segment.fd is not None:
                    os.close(segment.fd)
                    segment.fd = None
            self._open.clear()
            if self._dir_fd is not None:
                os.close(self._dir_fd)  # releases the lock
                self._dir_fd = None


def parse_segment(data: bytes) -> tuple[list[SpooledEvent], list[tuple[int, bool]]]:
    """The events in a segment's bytes, and the (1-based line number, torn) of each line skipped.

    A last line without its newline is a write cut short by a crash: kept if it parses, else skipped as torn.
    """
    lines = data.split(b"\n")
    events: list[SpooledEvent] = []
    skipped: list[tuple[int, bool]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = loads(line)
            events.append(SpooledEvent(str(raw["topic"]), str(raw["key"]).encode(), str(raw["value"]).encode()))
        except (InvalidEvent, KeyError, TypeError):
            skipped.append((number, number == len(lines)))
    return events, skipped


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _fsync(fd: int, path: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        # The data may not be on disk; it is still in the file and will be sent. Say so loudly.
        log.error("usage spool: fsync of %s failed (%s)", path, exc.strerror)
