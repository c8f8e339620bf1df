"""The queue between the API and the processor.

The embedded default is a JSON-lines file: writers (API workers, any number
of processes and threads) append whole lines under an exclusive lock and one
processor reads them. QUEUE_URL=redis://... chooses a Redis Stream instead,
read by any number of processors. Every queue offers the same two roles:

    writer side:   queue.append(lines)      durable in the queue on return
                   queue.size()             acknowledged but not yet stored
                   queue.check_writable()   raises QueueUnavailable if not
                   queue.name               names its checkpoint in the store
    consumer side: consumer = queue.consumer(checkpoint)
                   batch = consumer.read(max_items)
                   ... store batch.items together with batch.checkpoint ...
                   consumer.acknowledge(batch)

A queue may deliver an event again after a crash (Redis does, before it is
acknowledged); the store ignores event ids it already has, so what is stored
is still exactly once.
"""
import errno
import fcntl
import logging
import math
import mmap
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass

from config import REDIS_SCHEMES

log = logging.getLogger("queue")

_COUNTERS = struct.Struct("<QQ")  # events appended, events consumed
_COUNTER = struct.Struct("<Q")     # each side writes only its own: appended at 0, consumed at 8
_END_OFFSET = 16                   # writers: where the active segment ended after the last whole write
_POSITION = struct.Struct("<QQ")   # the consumer: segment and offset of its next unread line
_POSITION_OFFSET = 24
_STATE_SIZE = 40
_WHOLE_END = struct.Struct("<QQQQ")  # the lock file: the boot, the active segment's inode, that
                                    # end, and the appended counter then
_ID_PREFIX = b'{"id":"'            # every queued event starts with its id, whose first 14 hex
_ID_TIME_DIGITS = 14               # digits are the microseconds since 1970 when it was accepted
_READ_CHUNK = 1024 * 1024
_TAIL = 64                         # bytes before a position that its checkpoint fingerprints
# the queue's segments and the dead letters hold events, user ids and User-Agents: they are the
# owner's alone whatever the umask, as the database is (the queue's own counters and locks are not)
PRIVATE = 0o600


class QueueUnavailable(Exception):
    """The queue cannot take events now; the client should retry.

    maybe_stored: the queue did not answer in time after the events were sent,
    so they may have been queued all the same.
    """

    def __init__(self, message, maybe_stored=False):
        super().__init__(message)
        self.maybe_stored = maybe_stored


class QueueBusy(Exception):
    """Another processor is already consuming this queue."""


@dataclass
class Batch:
    items: list          # raw lines (bytes), newline stripped
    checkpoint: str      # where the next read starts, stored with the items (None: not needed)
    receipts: list = None    # what the queue needs back to acknowledge the batch


def open_queue(config):
    if config.queue_path.startswith(REDIS_SCHEMES):
        from redis_queue import RedisQueue
        return RedisQueue(config.queue_path, claim_idle=config.claim_idle)
    return FileQueue(config.queue_path, fsync=config.fsync,
                     fsync_interval=config.fsync_interval,
                     segment_bytes=config.segment_bytes)


class FileQueue:
    """A JSON-lines queue file with segments that are reclaimed once stored.

    Files beside the queue path P:
      P            the active segment, where writers append
      P.<seq>      a sealed segment the consumer is finishing (at most one)
      P.lock       the writers' lock; the consumer takes it to rotate, and shared to read P
      P.state      two counters (appended, consumed) for an O(1) queue size, and
                   where the last whole write ended in P, kept in P.lock too with P's
                   inode, the boot and the appended counter: bytes past it are a
                   write under way or one whose writer died
      P.consumer   held by the one processor that consumes the queue
    """

    _fd = _lock_fd = _lock_map = _state = None     # until opened; __del__ may come first

    def __init__(self, path, fsync="never", fsync_interval=0.2,
                 segment_bytes=64 * 1024 * 1024):
        self.path = os.path.abspath(path)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.segment_bytes = segment_bytes
        self._thread_lock = threading.Lock()  # flock does not separate threads
        self._fd = None
        self._inode = None
        self._lock_fd = None
        self._lock_map = None
        self._state = None
        self._state_inode = None
        self._last_sync = -math.inf     # the first append is synced at once
        self._unsynced = False          # FSYNC=batch: appended since the last sync
        self._sync_timer = None
        self._pid = None
        self._boot = _boot_id()

    @property
    def name(self):
        return os.path.basename(self.path)

    def describe(self):
        return self.path

    # -- writer side -------------------------------------------------------

    def append(self, lines):
        """Append encoded lines (each ending in a newline) as one write.

        Four system calls in the common case: lock, stat, write, unlock.
        """
        data = b"".join(lines)
        with self._thread_lock:
            try:
                self._ensure_open()
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                try:
                    end = self._write_whole(data, self._reopen_if_rotated())
                    self._add_appended(len(lines), end)
                finally:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                self._sync_by_policy()
            except OSError as error:
                self._close_files()
                raise QueueUnavailable(f"cannot write to the queue: {error.strerror or error}") from error

    def size(self):
        """Events acknowledged and not yet stored; two integers, no scan."""
        with self._thread_lock:
            try:
                self._ensure_open()
            except OSError as error:
                raise QueueUnavailable(f"cannot open the queue: {error.strerror or error}") from error
            self._follow_state_file()
            appended, consumed = _COUNTERS.unpack_from(self._state, 0)
        return max(0, appended - consumed)

    def oldest_age(self):
        """Seconds since the oldest event not yet stored was accepted; 0 if none is waiting.

        Reads the start of the line where the consumer stands (its position is
        in the state file), so it is O(1) too.
        """
        if self.size() == 0:
            return 0.0
        with self._thread_lock:
            segment, offset = _POSITION.unpack_from(self._state, _POSITION_OFFSET)
        sealed = f"{self.path}.{segment}"
        if os.path.exists(sealed):     # the consumer is finishing a sealed segment
            places = ((sealed, offset), (f"{self.path}.{segment + 1}", 0), (self.path, 0))
        else:
            places = ((self.path, offset),)
        for path, start in places:
            head = _read_head(path, start)
            if head.startswith(_ID_PREFIX):
                digits = head[len(_ID_PREFIX):len(_ID_PREFIX) + _ID_TIME_DIGITS]
                try:
                    return max(0.0, time.time() - int(digits, 16) / 1e6)
                except ValueError:
                    return 0.0
        return 0.0

    def check_writable(self):
        """Raise QueueUnavailable unless an append could succeed now."""
        with self._thread_lock:
            try:
                self._ensure_open()
                self._reopen_if_rotated()
                if os.fstat(self._fd).st_nlink == 0:
                    raise QueueUnavailable("the queue file was removed")
                stats = os.statvfs(os.path.dirname(self.path))
            except OSError as error:
                self._close_files()
                raise QueueUnavailable(f"cannot open the queue: {error.strerror or error}") from error
        if stats.f_bavail * stats.f_frsize < 1024 * 1024:
            raise QueueUnavailable("less than 1 MiB of disk space left for the queue")

    def close(self):
        with self._thread_lock:
            self._close_files()

    def __del__(self):
        self._close_files()     # a queue let go of without close(): its descriptors are plain ints

    def _ensure_open(self):
        # gunicorn forks workers after the app is built: descriptors are per process.
        if self._pid != os.getpid():
            self._fd = self._lock_fd = self._lock_map = self._state = None
            self._unsynced, self._sync_timer = False, None     # the timer stayed in the parent
            self._pid = os.getpid()
        if self._fd is None:
            try:
                self._state = _map(self.path + ".state", _STATE_SIZE)
                self._state_inode = os.stat(self.path + ".state").st_ino
                self._lock_fd = open_for_mapping(self.path + ".lock", _WHOLE_END.size)
                self._lock_map = mmap.mmap(self._lock_fd, _WHOLE_END.size)
                self._open_active()
            except BaseException:
                self._close_files()       # or each try (every /health) leaves descriptors open
                raise

    def _follow_state_file(self):
        """Map the state file again if it was replaced (an operator deleted it).

        Processes started since then count in the new one: a process that kept
        the old one would report, or record, counts that nobody else sees.
        """
        if _inode(self.path + ".state") != self._state_inode:
            self._close_files()
            self._ensure_open()

    def _open_active(self):
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, PRIVATE)
        self._inode = os.fstat(self._fd).st_ino

    def _close_files(self):
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        for mapping in (self._state, self._lock_map):
            if mapping is not None:
                mapping.close()
        self._fd = self._lock_fd = self._lock_map = self._state = None

    def _reopen_if_rotated(self):
        """Under the lock: follow a rotation (or a removed file) to the new active segment.

        Returns the size of the active segment, where this write will start.
        """
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino == self._inode:
            return current.st_size
        if self._unsynced:          # the sealed segment keeps lines no later sync would reach
            self._sync()
        # forgotten before the open: if that fails, its number may be another thread's by then
        sealed, self._fd = self._fd, None
        os.close(sealed)
        self._open_active()
        return os.fstat(self._fd).st_size

    def _write_whole(self, data, size):
        """Under the lock: append data to the active segment of size bytes, or nothing at all.

        A writer killed mid-write (an API worker's kill -9: Linux stops a long
        write partway) leaves the first lines of a batch whose client got no
        answer and sends it again: they would be stored twice. Those bytes lie
        past where the last whole write ended, so they are cut off first. A
        write cut short here (the disk filled up) is cut back the same way;
        the state file still says where the last whole write ended, and the
        queue holds what it held before. Returns where the segment now ends.
        """
        (whole_end,) = _COUNTER.unpack_from(self._state, _END_OFFSET)
        try:
            if size == whole_end:
                start = size
            elif (start := self._whole_end(self._inode)) is not None and start < size:
                self._cut_dead_write(self._fd, size, start)
                size = start
            else:
                start = self._terminate_torn_line(size)
            _write_all(self._fd, data)
        except OSError:
            os.ftruncate(self._fd, size)
            raise
        return start + len(data)

    def _whole_end(self, inode):
        """Under the lock: where the last whole write ended in the segment with this inode.

        None when that is not known for sure, and then nothing may be cut: the
        lock file's record is of another segment (or of none: a queue written
        by an earlier version, which kept the end in the state file only, or
        nowhere), or the end or the count it gives is not the state file's.
        They differ when the state file was replaced or zeroed, when a process
        still writes to a state file that was replaced (it keeps the one it
        mapped), and when a writer of an earlier version writes beside this
        one or after it (its workers finishing during a reload, a rollback):
        the oldest ones record no end at all, only their count, and bytes past
        the end recorded may be a write that another process acknowledged. A
        record from before the machine restarted is not known for sure either:
        both files are written through memory maps, which a power cut may
        lose while the events they describe were synced (FSYNC).
        """
        (end,) = _COUNTER.unpack_from(self._state, _END_OFFSET)
        (appended,) = _COUNTER.unpack_from(self._state, 0)
        if self._boot and _WHOLE_END.unpack_from(self._lock_map) == (self._boot, inode, end, appended):
            return end
        return None

    def _cut_dead_write(self, file, size, whole_end):
        """Under the lock: cut file (a descriptor or the path of the active segment) back to whole_end."""
        os.truncate(file, whole_end)
        log.warning("cut %d bytes off the end of %s: a write whose writer died before it was "
                    "acknowledged (killed mid-write)", size - whole_end, self.path)

    def _terminate_torn_line(self, size):
        """Under the lock, where the last whole write ended is not known: end a dead writer's fragment.

        The fragment then becomes a line of its own (a dead letter) instead of
        swallowing the start of the next, valid event. Returns the new size.
        """
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return size
        _write_all(self._fd, b"\n")
        return size + 1

    def _add_appended(self, count, end):
        """Record where the lines end and the count they make, then count them.

        Lines counted past the recorded end are an earlier version's, which
        counted and recorded no end: the count recorded then differs from the
        counter, and nothing is cut. A writer killed before its record leaves
        its lines past the end, to be cut off; one killed after it, the count
        short until the consumer recounts.
        """
        (appended,) = _COUNTER.unpack_from(self._state, 0)
        self._record_whole_end(self._inode, end, appended + count)
        _COUNTER.pack_into(self._state, 0, appended + count)

    def _record_whole_end(self, inode, end, appended):
        _COUNTER.pack_into(self._state, _END_OFFSET, end)
        _WHOLE_END.pack_into(self._lock_map, 0, self._boot, inode, end, appended)

    def _recount(self, inode, appended):
        """Under the lock (a shared hold will do: writers take it whole): set the appended
        counter to the lines the queue holds; where whole writes end in the active segment
        (with this inode) stays known if it was."""
        end = self._whole_end(inode)
        if end is not None:
            self._record_whole_end(inode, end, appended)
        _COUNTER.pack_into(self._state, 0, appended)

    def _sync_by_policy(self):
        if self.fsync == "always":
            os.fdatasync(self._fd)
        elif self.fsync == "batch":
            wait = self._last_sync + self.fsync_interval - time.monotonic()
            if wait <= 0:
                self._sync()
                return
            # a later append may sync these lines; if none comes, a timer does, so that a
            # power cut loses at most the interval, not the last events before a lull
            self._unsynced = True
            if self._sync_timer is None:
                self._sync_timer = threading.Timer(wait, self._sync_later)
                self._sync_timer.daemon = True
                self._sync_timer.start()

    def _sync(self):
        os.fdatasync(self._fd)
        self._last_sync = time.monotonic()
        self._unsynced = False

    def _sync_later(self):
        with self._thread_lock:
            self._sync_timer = None
            if not self._unsynced or self._fd is None:
                return
            try:
                self._sync()
            except OSError as error:
                log.warning("cannot sync the queue to disk: %s", error.strerror or error)

    # -- consumer side -----------------------------------------------------

    def consumer(self, checkpoint=None):
        return FileQueueConsumer(self, checkpoint)


class FileQueueConsumer:
    """Reads complete lines from a checkpoint; the only reader of its queue.

    A checkpoint is "segment:offset:consumed:fingerprint": the segment number,
    the byte offset of the next unread line in it, how many lines were
    consumed in all, and a CRC-32 of the bytes just before that offset. The
    store keeps it in the same transaction as the rows, so after a crash
    reading resumes exactly after the last stored event. The fingerprint tells
    whether the queue on disk is the one the checkpoint was taken in.
    """

    _guard = None       # until opened; __del__ may come first

    def __init__(self, queue, checkpoint):
        self.queue = queue
        self._guard = os.open(queue.path + ".consumer", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise QueueBusy(f"another processor is already consuming {queue.path}; "
                            f"only one processor may consume a file queue") from None
        try:
            queue._ensure_open()
            self.segment, self.offset, self.consumed = self._start(checkpoint)
            self._remove_sealed_before(self.segment)
            # the active segment is numbered one past the last sealed one
            self._active_segment = max(self._sealed_segments() + [self.segment - 1]) + 1
            self._held = _fingerprint(self._segment_path(self.segment), self.offset)
            self._sync_counters()
        except BaseException:
            self.close()                # or the processor's next try finds the queue taken
            raise

    def read(self, max_items):
        """Up to max_items complete lines from the current position.

        A last line without its newline (a write still under way, or a torn
        one) is left for later: it is never half-read.
        """
        with self.queue._thread_lock:
            self.queue._follow_state_file()
        if _fingerprint(self._segment_path(self.segment), self.offset) != self._held:
            self._restart_from_oldest()
        items = []
        segment, offset = self.segment, self.offset
        while len(items) < max_items:
            path = self._segment_path(segment)
            chunk = self._read_whole_writes(path, offset, self.consumed + len(items))
            end = chunk.rfind(b"\n") + 1
            if end == 0:
                if path == self.queue.path:
                    break
                segment, offset = segment + 1, 0    # the sealed segment is finished
                continue
            lines = chunk[:end - 1].split(b"\n")
            wanted = max_items - len(items)
            if len(lines) > wanted:
                lines = lines[:wanted]
                end = sum(map(len, lines)) + len(lines)
            items.extend(lines)
            offset += end
        checkpoint = format_checkpoint(segment, offset, self.consumed + len(items),
                                       _fingerprint(self._segment_path(segment), offset))
        return Batch(items, checkpoint)

    def acknowledge(self, batch):
        """Called after the batch and its checkpoint are committed to the store."""
        segment, offset, consumed, self._held = parse_checkpoint(batch.checkpoint)
        self.segment, self.offset, self.consumed = segment, offset, consumed
        self._set_consumed(consumed)
        self._remove_sealed_before(segment)
        self._rotate_if_full()

    def held_by_others(self, up_to=None):
        return None             # a file queue has one consumer: this one

    def close(self):
        guard, self._guard = self._guard, None
        if guard is not None:
            os.close(guard)

    def __del__(self):
        self.close()            # a consumer let go of without close() lets another one start

    def _read_whole_writes(self, path, offset, lines_before):
        """A chunk of a segment from offset, never lines of a write that may still be cut back.

        A writer whose write fails (the disk is full) truncates what it wrote
        while holding the writers' lock, and the next writer cuts off what a
        writer killed mid-write left past the end of the last whole write.
        Reading the active segment under a shared hold of that lock, and only
        up to that end where it is known, keeps such lines from being stored,
        and the position from landing past the end the segment is cut back to.

        A chunk that reaches the end of the active segment sees every line
        ever appended (lines_before are the lines before offset), so the
        appended counter is set to that while no writer can add to it: a
        writer killed between its count and recording where its write ended,
        or between its write and its count where that end is not known, would
        otherwise leave queue_size off until the processor restarts.
        """
        if path != self.queue.path:
            return _read_chunk(path, offset)
        fcntl.flock(self.queue._lock_fd, fcntl.LOCK_SH)
        try:
            chunk = _read_chunk(path, offset, self.queue._whole_end)
            if len(chunk) < _READ_CHUNK:
                self.queue._recount(_inode(path), lines_before + chunk.count(b"\n"))
            return chunk
        finally:
            fcntl.flock(self.queue._lock_fd, fcntl.LOCK_UN)

    def _start(self, checkpoint):
        """(segment, offset, consumed) where reading starts: the checkpoint, if the queue holds it.

        It does not when the database or the queue was replaced since it was
        taken (a backup restored, a database moved beside a new queue, a
        queue deleted): its segment is gone, or the bytes before its offset
        are not the ones it fingerprinted. Reading then starts at the oldest
        line the queue holds, and the store skips the events it already has
        by their ids; starting at the checkpoint's offset in another file
        would skip events, or read half a line.
        """
        segment, offset, consumed, fingerprint = parse_checkpoint(checkpoint)
        sealed = self._sealed_segments()
        oldest = sealed[0] if sealed else segment
        if checkpoint is None:
            return oldest, 0, 0
        if segment in sealed:
            path = f"{self.queue.path}.{segment}"
        elif not sealed or segment > sealed[-1]:
            path = self.queue.path      # the active segment is numbered past every sealed one
        else:
            path = None                 # reclaimed: the checkpoint is older than the queue
        held = _fingerprint(path, offset) if path is not None else None    # None: fewer bytes
        if held is not None and fingerprint in (None, held):    # None: a checkpoint from before
            return segment, offset, consumed
        log.warning("queue position %s of the store is not in %s (the database or the queue was "
                    "replaced since it was stored); reading from the oldest line the queue holds, "
                    "events already stored are skipped by their ids", checkpoint, self.queue.path)
        return oldest, 0, consumed

    def _restart_from_oldest(self):
        """The bytes before our position are gone (the queue file was deleted or emptied while we
        ran): read on from the oldest line the queue holds, as _start does, instead of waiting
        forever at an offset the new file may never reach."""
        log.warning("the queue %s no longer holds the lines before position %d:%d (deleted or "
                    "truncated?); reading from the oldest line it holds, events already stored "
                    "are skipped by their ids", self.queue.path, self.segment, self.offset)
        sealed = self._sealed_segments()
        self.segment, self.offset = (sealed[0] if sealed else self._active_segment), 0
        self._held = _fingerprint(self._segment_path(self.segment), 0)

    def _segment_path(self, segment):
        sealed = f"{self.queue.path}.{segment}"
        return sealed if os.path.exists(sealed) else self.queue.path

    def _rotate_if_full(self):
        """Seal the active segment once it holds segment_bytes, read or not.

        Under the writers' lock it is renamed to P.<its number> and an empty
        active segment takes its place; writers see the new inode on their
        next append and reopen. Reading goes on in the sealed file, whose
        name the checkpoints already use. What a writer killed mid-write left
        past the last whole write is cut off first, as the next writer would:
        sealed, it would be read.
        """
        queue = self.queue
        try:
            if os.path.getsize(queue.path) < queue.segment_bytes:
                return
        except FileNotFoundError:
            return
        fcntl.flock(queue._lock_fd, fcntl.LOCK_EX)
        try:
            active = os.stat(queue.path)
            whole_end = queue._whole_end(active.st_ino)
            if whole_end is not None and whole_end < active.st_size:
                queue._cut_dead_write(queue.path, active.st_size, whole_end)
            os.rename(queue.path, f"{queue.path}.{self._active_segment}")
            fd = os.open(queue.path, os.O_WRONLY | os.O_CREAT, PRIVATE)
            queue._record_whole_end(os.fstat(fd).st_ino, 0, _COUNTER.unpack_from(queue._state, 0)[0])
            os.close(fd)
            if queue._fd is not None:
                # the sealed segment is deleted once read, and an open descriptor would keep
                # its disk space for as long as the processor runs
                queue._reopen_if_rotated()
            self._active_segment += 1
        finally:
            fcntl.flock(queue._lock_fd, fcntl.LOCK_UN)

    def _remove_sealed_before(self, segment):
        for number in self._sealed_segments():
            if number < segment:
                os.remove(f"{self.queue.path}.{number}")

    def _sealed_segments(self):
        directory, base = os.path.split(self.queue.path)
        pattern = re.compile(re.escape(base) + r"\.(\d+)$")
        return sorted(int(match.group(1)) for match in map(pattern.match, os.listdir(directory))
                      if match)

    def _sync_counters(self):
        """Recount the backlog from our position, once at start.

        The appended counter may be behind if a writer died between its write
        and its count, or the state file was lost; counting the unread lines
        (the queue is bounded, this runs once) makes queue_size exact again.
        """
        queue = self.queue
        fcntl.flock(queue._lock_fd, fcntl.LOCK_EX)
        try:
            backlog = 0
            for number in range(self.segment, self._active_segment + 1):
                offset = self.offset if number == self.segment else 0
                path = self._segment_path(number)
                backlog += _count_lines(path, offset, queue._whole_end if path == queue.path else None)
            _COUNTER.pack_into(queue._state, _COUNTER.size, self.consumed)
            queue._recount(_inode(queue.path), self.consumed + backlog)
            _POSITION.pack_into(queue._state, _POSITION_OFFSET, self.segment, self.offset)
        finally:
            fcntl.flock(queue._lock_fd, fcntl.LOCK_UN)

    def _set_consumed(self, consumed):
        _COUNTER.pack_into(self.queue._state, _COUNTER.size, consumed)
        _POSITION.pack_into(self.queue._state, _POSITION_OFFSET, self.segment, self.offset)


def parse_checkpoint(checkpoint):
    """(segment, offset, consumed, fingerprint); a checkpoint from before fingerprints has None."""
    if not checkpoint:
        return 0, 0, 0, None
    segment, offset, consumed, *fingerprint = checkpoint.split(":")
    return int(segment), int(offset), int(consumed), (fingerprint or [None])[0]


def format_checkpoint(segment, offset, consumed, fingerprint):
    return f"{segment}:{offset}:{consumed}:{fingerprint}"


def _fingerprint(path, offset):
    """The CRC-32 of the bytes before offset in a segment, or None if it has fewer."""
    start = max(0, offset - _TAIL)
    try:
        with open(path, "rb") as file:
            file.seek(start)
            data = file.read(offset - start)
    except FileNotFoundError:
        return None
    return f"{zlib.crc32(data):08x}" if len(data) == offset - start else None


def _read_chunk(path, offset, whole_end=None):
    """Up to _READ_CHUNK bytes of path from offset, and with whole_end(inode), only up to the
    end it gives (where it gives one)."""
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read(min(_READ_CHUNK, _readable(file, offset, whole_end)))
    except FileNotFoundError:
        return b""


def _readable(file, offset, whole_end):
    """How many bytes of file may be read from offset: all (inf), or up to the end whole_end gives."""
    end = whole_end(os.fstat(file.fileno()).st_ino) if whole_end else None
    return math.inf if end is None else max(0, end - offset)


def _read_head(path, offset):
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read(len(_ID_PREFIX) + _ID_TIME_DIGITS)
    except FileNotFoundError:
        return b""


def _count_lines(path, offset, whole_end=None):
    count = 0
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            left = _readable(file, offset, whole_end)
            while left > 0 and (block := file.read(min(_READ_CHUNK, left))):
                count += block.count(b"\n")
                left -= len(block)
    except FileNotFoundError:
        pass
    return count


def _inode(path):
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _boot_id():
    """A number for this boot of the machine (0 if the system does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return int(file.read().replace("-", "")[:16], 16)
    except (OSError, ValueError):
        return 0


def _map(path, length):
    fd = open_for_mapping(path, length)
    try:
        return mmap.mmap(fd, length)
    finally:
        os.close(fd)


def append_whole(path, data):
    """Append data to a file that holds events (made private: see PRIVATE), whole or not at all.

    A write cut short (the disk filled up) is cut back off: the next one would
    otherwise carry on its torn last line. The lock keeps processors that share
    the file from cutting back each other's lines.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def open_for_mapping(path, length):
    """A descriptor of path (created if missing) whose first length bytes have their blocks on disk.

    For a file that is memory-mapped: grown with ftruncate it would be sparse,
    and the first store into a page without a block on a full disk is a
    SIGBUS that kills the process. Reserved here, a full disk is an OSError
    (ENOSPC) when the file is opened, which the caller can answer.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _reserve(fd, path, length)
    except OSError as error:
        os.close(fd)
        error.filename = path
        raise
    return fd


def _reserve(fd, path, length):
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):     # the file system cannot
            raise
        _append_zeros_up_to(path, length)


def _append_zeros_up_to(path, length):
    """Where blocks cannot be reserved, write them: zeros from the end of the file up to length.

    Appended, never written at an offset: another process may be doing the
    same and already storing into the bytes past the end seen here. The file
    may then grow longer than length, which does no harm.
    """
    with open(path, "ab") as file:
        missing = length - file.tell()
        if missing > 0:
            file.write(bytes(missing))


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
