"""The writer's input: an append-only journal of records on local disk, synced on every append.

A record is on disk before :meth:`Journal.append` returns, so whatever a client was told of
survives a database outage, a crash and a SIGKILL. The writer thread reads entries in order
and commits them once the database has; the next :meth:`Journal.open` reads again whatever
was not committed. The database writes are upserts on the records' ids, so an entry written
twice is still one row.

In ``folder``:

* ``<first seq>.seg``: segments of lines ``<crc32 as 8 hex> <JSON [seq, unix time, type,
  fields]>``; appends go to the last one until it reaches ``segment_bytes``, and a segment
  whose entries are all committed is deleted;
* ``done``: the last sequence number committed (not synced: losing it only replays entries
  that are already in the database);
* ``rejected.jsonl``: entries the database refused for what they hold, kept for an operator;
* ``lock``: held (flock) by the one process that uses the folder.

A crash in the middle of an append leaves a torn last line that fails its checksum; opening
cuts it off. Its ``append`` never returned, so nobody was told of that record.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from monitor.storage.engine import StorageError
from monitor.storage.records import Record, from_json, to_json

if TYPE_CHECKING:
    from typing import Self

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_SEGMENT_BYTES = 16 << 20
_READ_CHUNK = 1 << 18
_sync = getattr(os, "fdatasync", os.fsync)  # the data and the file's size, not its times


class JournalFull(Exception):
    """Nothing was appended: the entry does not fit under ``max_bytes``, or the disk failed."""


@dataclass(frozen=True)
class Entry:
    seq: int
    t: float  # unix time of the append
    record: Record
    body: bytes  # the JSON as stored


@dataclass
class _Segment:
    first: int
    path: Path
    size: int = 0
    last: int = 0  # highest seq in it; first - 1 while it has none


def _body(line: bytes) -> bytes | None:
    """The JSON of a stored line, or None when the line is torn or damaged."""
    if len(line) < 11 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    body = line[9:-1]
    try:
        ok = int(line[:8], 16) == zlib.crc32(body)
    except ValueError:
        return None
    return body if ok else None


def _seq(body: bytes) -> int:
    return int(body[1 : body.index(b",")])  # bodies start "[<seq>,"


def _lock(folder: Path) -> IO[str]:
    """The folder's lock, held; StorageError when the folder is unusable or another process has it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / "lock", "a")  # held as long as the journal is open
    except OSError as exc:
        raise StorageError(f"cannot use journal folder {folder}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StorageError(
            f"journal folder {folder} is in use by another latentwatch server: give each its own journal_dir"
        ) from None
    return handle


def check_journal_dir(folder: str | Path) -> None:
    """Fail fast, before the model loads, when a server could not use ``folder`` (StorageError)."""
    folder = Path(folder)
    _lock(folder).close()
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StorageError(f"journal folder {folder} is not writable")


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Append from any thread; read, commit and reject from one (the writer's)."""

    def __init__(self, folder: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, *, segment_bytes: int | None = None):
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(1, min(DEFAULT_SEGMENT_BYTES, max_bytes // 8))
        self.replayed = 0  # entries not yet committed when the journal was opened
        self.damaged = 0  # lines skipped for a bad checksum (not a torn tail, which is expected)
        self._mutex = threading.Lock()
        self._segments: list[_Segment] = []
        self._lockfile: IO[str] | None = None
        self._fd = -1  # the last segment's, for appends
        self._unsynced = False  # appended without a sync since the last one
        self._broken: str | None = None  # an append that failed could not be undone
        self._next = 1
        self._done = 0
        self._depth = 0
        self._bytes = 0
        self._oldest: float | None = None  # append time of the oldest entry not committed, when known
        self._reading: _Segment | None = None
        self._rfd = -1
        self._roff = 0

    # ------------------------------------------------------------------ open / close

    def open(self) -> Self:
        """Take the folder, cut a torn tail off, and find what is not committed yet. StorageError
        when the folder cannot be used."""
        self._lockfile = _lock(self.folder)
        try:
            self._done = int((self.folder / "done").read_text() or 0)
        except (OSError, ValueError):
            self._done = 0  # replay everything there is: upserts absorb what is already in
        paths = sorted(self.folder.glob("*.seg"))  # zero-padded names: this is seq order
        try:
            for i, path in enumerate(paths):
                self._segments.append(self._scan(_Segment(int(path.stem), path), tail=i == len(paths) - 1))
            self._next = max([self._done] + [s.last for s in self._segments]) + 1
            if not self._segments:
                self._segments.append(self._new_segment(self._next))
            self._bytes = sum(s.size for s in self._segments)
            self._drop_committed()
            self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)
            self._reading = self._segments[0]
            self._rfd = os.open(self._reading.path, os.O_RDONLY)
        except (OSError, ValueError) as exc:
            self.close()
            raise StorageError(f"cannot open the journal in {self.folder}: {exc}") from exc
        self.replayed = self._depth
        return self

    def _scan(self, seg: _Segment, *, tail: bool) -> _Segment:
        data = seg.path.read_bytes()
        seg.last, pos, good_end, bad, damaged = seg.first - 1, 0, 0, 0, 0
        while pos < len(data):
            end = data.find(b"\n", pos) + 1 or len(data)
            body = _body(data[pos:end])
            if body is None:
                bad += 1
            else:
                seq = _seq(body)
                seg.last, good_end, damaged, bad = max(seg.last, seq), end, damaged + bad, 0
                self._depth += seq > self._done
            pos = end
        if bad and tail:
            log.warning("journal: cutting a torn entry (%d bytes) off the end of %s", len(data) - good_end, seg.path)
            os.truncate(seg.path, good_end)
            seg.size = good_end
        else:
            damaged += bad
            seg.size = len(data)
        if damaged:
            log.error("journal: %d damaged lines in %s are skipped", damaged, seg.path)
        self.damaged += damaged
        return seg

    def close(self) -> None:
        self.sync()
        with self._mutex:
            fds, self._fd, self._rfd = (self._fd, self._rfd), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        if self._lockfile is not None:
            self._lockfile.close()  # releases the flock
            self._lockfile = None

    # ------------------------------------------------------------------ append (any thread)

    def append(self, record: Record, sync: bool = True) -> int:
        """Append ``record`` and return its sequence number, once it is on disk when ``sync``; an
        unsynced record is made durable by the next synced append (same file, in order), by
        `sync()` or at rotation. Raises JournalFull, having appended nothing, when it does not
        fit or the disk fails."""
        kind, fields = to_json(record)
        rest = json.dumps([kind, fields], separators=(",", ":"))[1:].encode()
        with self._mutex:
            if self._fd < 0 or self._broken:
                raise JournalFull(self._broken or "the journal is closed")
            seq = self._next
            body = b"[%d,%.3f,%s" % (seq, time.time(), rest)
            line = b"%08x %s\n" % (zlib.crc32(body), body)
            if self._bytes + len(line) > self.max_bytes:
                raise JournalFull(f"{self._bytes} of {self.max_bytes} bytes hold records not yet in the database")
            seg = self._segments[-1]
            try:
                if seg.size and seg.size + len(line) > self.segment_bytes:
                    seg = self._rotate(seq)
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view) :]
                if sync:
                    _sync(self._fd)
                self._unsynced = not sync
            except OSError as exc:
                self._undo(seg)
                raise JournalFull(f"cannot write {seg.path}: {exc.strerror or exc}") from exc
            seg.size += len(line)
            seg.last = seq
            self._bytes += len(line)
            self._next = seq + 1
            if not self._depth:
                self._oldest = time.time()
            self._depth += 1
            return seq

    def _new_segment(self, first: int) -> _Segment:
        seg = _Segment(first, self.folder / f"{first:020d}.seg", 0, first - 1)
        os.close(os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        _sync_folder(self.folder)  # the new name survives a power cut too
        return seg

    def _rotate(self, first: int) -> _Segment:
        seg = self._new_segment(first)
        fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
        if self._unsynced:
            _sync(self._fd)
            self._unsynced = False
        os.close(self._fd)
        self._fd = fd
        self._segments.append(seg)
        return seg

    def _undo(self, seg: _Segment) -> None:
        """Cut a failed append's bytes off again, or refuse every later append: one after a torn
        line would share its line and be lost."""
        try:
            os.ftruncate(self._fd, seg.size)
        except OSError as exc:
            self._broken = f"a failed append could not be undone in {seg.path} ({exc.strerror or exc}): restart"
            log.error("journal: %s", self._broken)

    def sync(self) -> None:
        """Make every appended record durable (the writer calls this at least every 100 ms)."""
        with self._mutex:
            if self._unsynced and self._fd >= 0:
                _sync(self._fd)
                self._unsynced = False

    # ------------------------------------------------------------------ the writer's side

    def read(self, limit: int) -> list[Entry]:
        """Up to ``limit`` entries after the last one read, oldest first; never blocks."""
        out: list[Entry] = []
        while len(out) < limit and self._reading is not None:
            with self._mutex:
                seg, end = self._reading, self._reading.size
                nxt = next((s for s in self._segments if s.first > seg.first), None)
            if self._roff >= end:
                if nxt is None:
                    break
                os.close(self._rfd)
                self._reading, self._rfd, self._roff = nxt, os.open(nxt.path, os.O_RDONLY), 0
                continue
            chunk = os.pread(self._rfd, min(end - self._roff, _READ_CHUNK), self._roff)
            if b"\n" not in chunk:  # one line longer than a chunk
                chunk = os.pread(self._rfd, end - self._roff, self._roff)
            pos = 0
            while len(out) < limit and (nl := chunk.find(b"\n", pos)) >= 0:
                entry = self._entry(chunk[pos : nl + 1])
                pos = nl + 1
                if entry is not None and entry.seq > self._done:
                    out.append(entry)
            if not pos:
                raise OSError(f"short read in {seg.path} at {self._roff}")
            self._roff += pos
        if out and self._oldest is None:
            self._oldest = out[0].t
        return out

    def _entry(self, line: bytes) -> Entry | None:
        body = _body(line)
        if body is None:
            self.damaged += 1
            log.error("journal: skipping a damaged line in %s", self._reading.path if self._reading else "?")
            return None
        try:
            seq, t, kind, fields = json.loads(body)
            return Entry(seq, t, from_json(kind, fields), body)
        except (ValueError, TypeError) as exc:  # e.g. written by a version whose records had other fields
            if _seq(body) > self._done:
                self._keep(body, f"cannot be read back: {exc}")
                with self._mutex:
                    self._depth -= 1
            return None

    def commit(self, entries: list[Entry]) -> None:
        """``entries``, the oldest read and in order, are in the database: drop them."""
        last = entries[-1].seq
        with self._mutex:
            self._done = last
            self._depth -= len(entries)
            self._oldest = None
        self._drop_committed()
        tmp = self.folder / "done.tmp"
        try:
            tmp.write_text(str(last))
            os.replace(tmp, self.folder / "done")
        except OSError as exc:
            log.warning("journal: cannot note progress in %s (%s); a restart replays more", self.folder, exc)

    def reject(self, entry: Entry, reason: str) -> None:
        """Keep an entry the database refused in ``rejected.jsonl`` (commit it afterwards)."""
        self._keep(entry.body, reason)

    def _keep(self, body: bytes, reason: str) -> None:
        line = b'{"reason":%s,"entry":%s}\n' % (json.dumps(reason).encode(), body)
        with open(self.folder / "rejected.jsonl", "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _drop_committed(self) -> None:
        with self._mutex:
            gone = [s for s in self._segments[:-1] if s.last <= self._done]
            for s in gone:
                self._segments.remove(s)
                self._bytes -= s.size
        for s in gone:
            try:
                s.path.unlink()
            except OSError as exc:
                log.warning("journal: cannot delete %s: %s", s.path, exc)

    # ------------------------------------------------------------------ state

    @property
    def depth(self) -> int:
        """Entries appended and not yet committed."""
        return self._depth

    @property
    def size_bytes(self) -> int:
        """Bytes the segments hold on disk."""
        return self._bytes

    @property
    def free_bytes(self) -> int:
        return self.max_bytes - self._bytes

    @property
    def last_seq(self) -> int:
        """The last sequence number appended (0: none yet)."""
        return self._next - 1

    @property
    def done_seq(self) -> int:
        """The last sequence number committed."""
        return self._done

    @property
    def oldest_age_s(self) -> float:
        """Seconds since the oldest entry not yet committed was appended; 0 when there is none."""
        t = self._oldest
        return max(0.0, time.time() - t) if t is not None and self._depth else 0.0
