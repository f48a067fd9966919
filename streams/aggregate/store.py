"""Local state stores for one ledger partition: RocksDB on disk, or memory for tests.

A store holds the partition's state records (the same keys and values as its
changelog) and the changelog offset it reflects, written atomically together,
so that a restart replays only the changelog's tail.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol, cast

__all__ = ["MemoryStore", "RocksStore", "Store"]

_CHECKPOINT = b"\x00checkpoint"
_IDENTITY = b"\x00identity"


class Store(Protocol):
    """Keys and values are bytes; ``None`` as a value deletes."""

    checkpoint: int
    identity: str

    def get(self, key: bytes) -> bytes | None: ...

    def scan(self, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]: ...

    def write(self, changes: Mapping[bytes, bytes | None], checkpoint: int) -> None: ...

    def reset(self, identity: str) -> None: ...

    def close(self) -> None: ...


class MemoryStore:
    """A dict: state lives as long as the process (restores replay the whole changelog)."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self.checkpoint = -1
        self.identity = ""

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def scan(self, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        lower = start if start is not None and start > prefix else prefix
        for key in sorted(k for k in self._data if k.startswith(prefix) and k >= lower):
            yield key, self._data[key]

    def write(self, changes: Mapping[bytes, bytes | None], checkpoint: int) -> None:
        for key, value in changes.items():
            if value is None:
                self._data.pop(key, None)
            else:
                self._data[key] = value
        self.checkpoint = checkpoint

    def reset(self, identity: str) -> None:
        self._data.clear()
        self.checkpoint = -1
        self.identity = identity

    def close(self) -> None:
        self._data.clear()


class RocksStore:
    """RocksDB (rocksdict) in a directory of its own; writes are atomic batches."""

    def __init__(self, path: Path) -> None:
        from rocksdict import Options, Rdict

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._options = Options(raw_mode=True)
        self._db = Rdict(str(self.path), options=self._options)
        raw = self._db.get(_CHECKPOINT)
        self.checkpoint = int(raw) if raw is not None else -1
        identity = self._db.get(_IDENTITY)
        self.identity = identity.decode() if identity is not None else ""

    def get(self, key: bytes) -> bytes | None:
        value = self._db.get(key)
        return None if value is None else bytes(value)

    def scan(self, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        lower = start if start is not None and start > prefix else prefix
        for key, value in self._db.items(from_key=lower):
            raw_key = cast(bytes, key)  # raw_mode: keys and values are bytes
            if not raw_key.startswith(prefix):
                break
            yield raw_key, cast(bytes, value)

    def write(self, changes: Mapping[bytes, bytes | None], checkpoint: int) -> None:
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        for key, value in changes.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        batch.put(_CHECKPOINT, str(checkpoint).encode())
        self._db.write(batch)
        self.checkpoint = checkpoint

    def reset(self, identity: str) -> None:
        """Wipe the store: its changelog was recreated, or it is too old to catch up."""
        from rocksdict import Rdict

        self._db.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(self.path), options=self._options)
        self._db[_IDENTITY] = identity.encode()
        self.checkpoint = -1
        self.identity = identity

    def close(self) -> None:
        self._db.close()
