"""The disk tier of the prefix cache: one file per KV page, content-addressed, kept across restarts.

Pure host code (no jax). A page's address is a hash chain over what its K/V depends on: the model fingerprint, the
namespace, and every token up to the page's end (``chain``), so a restarted server, or a second process on the same
machine with the same model, finds the pages of any prefix it is asked for, and a page of another model never
matches. When pages are written (write-through or write-back) and how a miss past the device and host tiers reads
the longest run of consecutive pages back into host slots, on a worker thread, is ``disk_tier.py``'s; ``put``
skips a page that is there.

A file: MAGIC, fingerprint (32 bytes), chain hash (32), payload length (8, little-endian), payload, then a 16-byte
blake2b checksum of everything before it. ``get`` verifies all of it; a truncated, corrupt or foreign file is
deleted and counted (``corrupt``), never served. Writes go to a temporary name and are renamed into place, so a
crash leaves no half file under a real name. ``budget_bytes`` is a hard cap: the least recently used files go
first. An unwritable directory or a full disk turns the tier off with one warning; the upper tiers keep serving.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
from typing import Callable, Sequence

import numpy as np

__all__ = ["DiskStore"]

log = logging.getLogger("sgl_jax.cache")

MAGIC = b"SGLJKV01"
_HEAD = len(MAGIC) + 32 + 32 + 8
_SUM = 16


class DiskStore:
    def __init__(self, directory: str, budget_bytes: int, fingerprint: str, page_bytes: int, page_size: int):
        self.dir = os.path.expanduser(directory)
        self.budget = int(budget_bytes)
        self.fp = hashlib.blake2b(fingerprint.encode(), digest_size=32).digest()
        self.page_bytes, self.page_size = int(page_bytes), int(page_size)
        self.file_bytes = _HEAD + self.page_bytes + _SUM
        self.enabled = True
        self.written = self.read_pages = self.corrupt = self.evicted = 0
        self._index: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # LRU order, oldest first
        self.on_forget: Callable[[bytes], None] | None = None  # called with an address that left the index
        try:
            os.makedirs(self.dir, exist_ok=True)
            entries = []
            for sub in os.listdir(self.dir):
                path = os.path.join(self.dir, sub)
                if len(sub) != 2 or not os.path.isdir(path):
                    continue
                for name in os.listdir(path):
                    if name.endswith(".kv") and len(name) == 67:
                        entries.append((os.path.getmtime(os.path.join(path, name)), bytes.fromhex(name[:64])))
            for _, h in sorted(entries):
                self._index[h] = None
        except (OSError, ValueError) as e:
            self._off(f"cannot use {self.dir!r} ({e})")
        self._fit(0)

    # ---------------------------------------------------------------- names
    def chain(self, tokens: Sequence[int], namespace: str = "") -> list[bytes]:
        """The address of each whole page of ``tokens``."""
        ps = self.page_size
        h = hashlib.blake2b(self.fp + namespace.encode(), digest_size=32).digest()
        out = []
        toks = np.asarray(tokens[: len(tokens) // ps * ps], np.int64)
        for i in range(0, len(toks), ps):
            h = hashlib.blake2b(h + toks[i:i + ps].tobytes(), digest_size=32).digest()
            out.append(h)
        return out

    def _path(self, h: bytes) -> str:
        x = h.hex()
        return os.path.join(self.dir, x[:2], x + ".kv")

    @property
    def num_pages(self) -> int:
        return len(self._index)

    @property
    def nbytes(self) -> int:
        return len(self._index) * self.file_bytes

    def has(self, h: bytes) -> bool:
        """Whether a page is stored under ``h``: in this store's index, or written since by another process on
        the same directory (then indexed; each process's budget counts the files it has seen)."""
        if not self.enabled:
            return False
        if h not in self._index and os.path.exists(self._path(h)):
            self._index[h] = None
        return h in self._index

    # ------------------------------------------------------------ read/write
    def put(self, h: bytes, data: np.ndarray) -> bool:
        """Write one page (``page_bytes`` uint8) under address ``h`` unless it is there; whether it was written."""
        if not self.enabled or h in self._index:
            return False
        body = MAGIC + self.fp + h + len(data).to_bytes(8, "little") + np.ascontiguousarray(data).tobytes()
        blob = body + hashlib.blake2b(body, digest_size=_SUM).digest()
        path = self._path(h)
        tmp = path + f".{os.getpid()}.tmp"
        if not self._fit(self.file_bytes):
            return False
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.remove(tmp)
            except OSError:
                pass
            self._off(f"writing {path!r} failed ({e})")
            return False
        self._index[h] = None
        self.written += 1
        return True

    def get(self, h: bytes) -> np.ndarray | None:
        """The page stored under ``h``, verified; None (and the file deleted) when missing, short, corrupt or
        written for another model."""
        if not self.has(h):
            return None
        return self.account(h, *self.read(h))

    def read(self, h: bytes) -> tuple[str, np.ndarray | None]:
        """Read and verify the file of ``h`` without touching the index: ("ok", page), ("missing", None) or
        ("corrupt", None). Safe on another thread (the disk tier's prefetch); ``account`` applies the outcome."""
        try:
            with open(self._path(h), "rb") as f:
                blob = f.read()
        except OSError:
            return "missing", None
        body, tail = blob[:-_SUM], blob[-_SUM:]
        ok = (len(blob) == self.file_bytes and body.startswith(MAGIC) and body[8:40] == self.fp
              and body[40:72] == h and int.from_bytes(body[72:80], "little") == self.page_bytes
              and hashlib.blake2b(body, digest_size=_SUM).digest() == tail)
        if not ok:
            return "corrupt", None
        return "ok", np.frombuffer(body, np.uint8, count=self.page_bytes, offset=_HEAD)

    def account(self, h: bytes, status: str, page: np.ndarray | None) -> np.ndarray | None:
        """Apply a ``read``'s outcome to the index (a use, a vanished file, or a damaged one deleted); returns
        the page when it was good."""
        if status == "ok":
            if h in self._index:
                self._index.move_to_end(h)
            self.read_pages += 1
            return page
        if status == "corrupt":
            self.corrupt += 1
            self._drop(h)
        else:
            self._forget(h)
        return None

    def clear(self) -> int:
        """Delete every page file in the directory (this process's and any other's); returns how many."""
        n = 0
        if not os.path.isdir(self.dir):
            return 0
        for sub in os.listdir(self.dir):
            path = os.path.join(self.dir, sub)
            if len(sub) != 2 or not os.path.isdir(path):
                continue
            for name in os.listdir(path):
                if name.endswith(".kv"):
                    try:
                        os.remove(os.path.join(path, name))
                        n += 1
                    except OSError:
                        pass
        self._index.clear()
        return n

    # --------------------------------------------------------------- budget
    def _fit(self, extra: int) -> bool:
        """Delete least recently used files until ``extra`` more bytes fit the budget; False if they never can."""
        if extra > self.budget:
            return False
        while self._index and self.nbytes + extra > self.budget:
            self._drop(next(iter(self._index)))
            self.evicted += 1
        return True

    def _forget(self, h: bytes) -> None:
        """``h`` leaves the index (``on_forget`` is told)."""
        if h in self._index:
            del self._index[h]
            if self.on_forget is not None:
                self.on_forget(h)

    def _drop(self, h: bytes) -> None:
        self._forget(h)
        try:
            os.remove(self._path(h))
        except OSError:
            pass

    def _off(self, why: str) -> None:
        if self.enabled:
            log.warning("the disk tier of the prefix cache is off: %s; the device and host tiers keep serving", why)
        self.enabled = False

    def measure_read_s(self, pages: int = 8) -> float:
        """Seconds to read and verify one page file, from `pages` probe files written under a name no chain hash
        has (then deleted). Files just written are likely still in the OS's cache: a floor for a cold read."""
        import time

        probe = DiskStore(os.path.join(self.dir, "probe"), 1 << 62, "probe", self.page_bytes, self.page_size)
        if not probe.enabled:
            return 0.0
        hs = probe.chain(list(range(pages * self.page_size)))
        for h in hs:
            probe.put(h, np.zeros(self.page_bytes, np.uint8))
        t0 = time.perf_counter()
        for h in hs:
            probe.get(h)
        dt = (time.perf_counter() - t0) / len(hs)
        for h in hs:
            probe._drop(h)
        return dt

    def stats(self) -> dict:
        return {"disk_pages": self.num_pages, "disk_bytes": self.nbytes, "disk_written": self.written,
                "disk_read": self.read_pages, "disk_corrupt": self.corrupt, "disk_evicted": self.evicted,
                "disk_enabled": self.enabled}
