"""How the programs log: text lines, or JSON lines with LOG_FORMAT=json.

A JSON line is one object: time, level, logger, pid, message, and every key=value
pair of the message as a field of its own, with the value that was logged
(a number stays a number, %.200r still cuts a string at 200 characters):

    log.info("progress stored=%d rate=%.0f/s", 1200, 240.5)
    {"time": "2025-03-01T10:00:00.123Z", "level": "INFO", "logger": "processor", "pid": 4242,
     "message": "progress stored=1200 rate=240/s", "stored": 1200, "rate": 240.5}

A record with an exception adds "exception", its traceback. The processor
uses formatter(); gunicorn.conf.py gives gunicorn these formatters, and the
API's own lines go through log_to_stderr() in either format.
"""
import contextlib
import fcntl
import logging
import logging.handlers
import os
import re
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone

import orjson

TEXT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"
RESERVED = frozenset({"time", "level", "logger", "pid", "message", "exception", "stack"})
# a printf conversion, with the key= written before it if any
# \b: a key starts a word, so a long word is read once, not once per letter in it
CONVERSION = re.compile(r"(?:\b(\w+)=)?%(?:\((\w+)\))?[-#0 +]*\d*(?:\.(\d+))?([diouxXeEfFgGcrsa%])")
# key=value written out in the message itself, such as reason=bot
LITERAL = re.compile(r"(?<![\w.])(\w+)=([^\s%'\"=]+)(?=\s|$)")
# the processor's log quotes events (a dead letter's line, user id and all): a log file made here is
# the owner's alone whatever the umask, as the dead letters are; one the operator made keeps its mode
PRIVATE = 0o600


class PrivateFile:
    """For a file handler: the log file, and each one a rotation begins, is created PRIVATE."""

    def _open(self):
        return self._builtin_open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                                  opener=lambda path, flags: os.open(path, flags, PRIVATE))


class SharedRotatingFileHandler(PrivateFile, logging.handlers.RotatingFileHandler):
    """RotatingFileHandler for a log that several processes write (processors sharing DATA_DIR).

    The standard handler rotates on its own count: when two processes share
    the file, one renames it while the other still writes to the old one,
    which the other then rotates again, and lines fall off the end. Here every
    write takes an exclusive lock on a file beside the log, first reopens the
    log if another process has rotated it, and only then checks the size and
    writes (the size is the file's own, as the handler seeks to its end
    first). The lock file is hidden, .NAME.lock, so that globs for the log
    and its older files (NAME*) leave it out.
    """

    def __init__(self, filename, **options):
        super().__init__(filename, **options)
        folder, name = os.path.split(self.baseFilename)
        self._lock_fd = os.open(os.path.join(folder, f".{name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)

    def emit(self, record):
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            if self.stream is not None and _moved_away(self):
                _close_moved_away(self)
            super().emit(record)        # opens the new file
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self):
        super().close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class WatchedFileHandler(PrivateFile, logging.handlers.WatchedFileHandler):
    """The standard handler, but reopening a log moved away (logrotate) that fails is an error
    of the line logged, not of the caller: the standard one reopens outside emit's handling."""

    def reopenIfNeeded(self):
        if self.stream is not None and _moved_away(self):
            _close_moved_away(self)
        if self.stream is None:
            self.stream = self._open()
            self._statstream()

    def emit(self, record):
        try:
            self.reopenIfNeeded()
        except OSError:
            self.handleError(record)
            return
        logging.FileHandler.emit(self, record)


def _moved_away(handler):
    try:
        return os.stat(handler.baseFilename).st_ino != os.fstat(handler.stream.fileno()).st_ino
    except FileNotFoundError:
        return True


def _close_moved_away(handler):
    """Close the file a handler writes to once it was moved away; its next line opens the new one.

    Lines still in its buffer are those a full disk had no room for, already
    reported as they failed (handleError): flushing them again would raise
    their error in whatever the program was logging from.
    """
    stream, handler.stream = handler.stream, None
    with contextlib.suppress(OSError):
        stream.close()


class EverySoOften:
    """A warning logged at most once every `seconds` by this process, saying how many were left out.

    For what fails every request during an outage (the queue or the rate
    limit's storage down): one line per problem, not two per request.
    """

    def __init__(self, logger, seconds=10.0):
        self.logger, self.seconds = logger, seconds
        self._lock = threading.Lock()
        self._last, self._left_out = -seconds, 0

    def warning(self, message, *args):
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.seconds:
                self._left_out += 1
                return
            left_out, self._last, self._left_out = self._left_out, now, 0
        if left_out:
            message += f" ({left_out} more like it since the last line)"
        self.logger.warning(message, *args)


def formatter(log_format):
    return JsonFormatter() if log_format == "json" else TextFormatter(TEXT)


class TextFormatter(logging.Formatter):
    """One line per message: a library's message may carry its own line breaks (libpq's
    "...refused\n\tIs the server running...?"), which line-based tools would read as a line
    without time or level. A traceback still follows its line."""

    def formatMessage(self, record):
        record.message = LINE_BREAK.sub(" ", record.message)
        return super().formatMessage(record)

    def formatTime(self, record, datefmt=None):
        """UTC, said so, as the days in messages and reports are: a local time without its
        offset reads as UTC beside them on any server whose zone is not."""
        return utc_time(record.created)


def log_to_stderr(config):
    """The API's lines (and its libraries') on stderr at LOG_LEVEL, in LOG_FORMAT.

    gunicorn configures only its own loggers unless given a logging config, and
    one given in text mode would also turn its access log on, client address
    and all; without this the app's lines fell to Python's last-resort
    handler: warnings only, without time or level.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(config.log_format))
    logging.basicConfig(level=config.log_level, handlers=[handler], force=True)
    for name in SCRUBBED:
        logging.getLogger(name).addFilter(scrub)


# what the servers write in lines of their own that no log of ours may hold: the client
# address (gunicorn when a request is not HTTP; werkzeug, under python ingestion_api.py,
# at the start of every request's line) and werkzeug's terminal colours, which are noise
# in a file or a JSON field
SCRUBBED = ("gunicorn.error", "werkzeug")
# gunicorn's line for such a request, formatted before it is logged, with the client's bytes in it
INVALID_REQUEST = re.compile(r"Invalid request from ip=\S*?: (.*)", re.DOTALL)
# gunicorn writes a header line without its colon whole: an (Proxy-)Authorization header's key with it
CREDENTIALS = re.compile(r"(?i)(authorization\W*)\w.*", re.DOTALL)
WERKZEUG_ADDRESS = re.compile(r"^\S+(?= - - \[)")
# (?<!...): a match starts only where a run of blanks does, or a run of 8,000 blanks with no line
# break after it was read again from each of its blanks, 32 million steps (0.65 s) for one line
LINE_BREAK = re.compile(r"(?<![ \t])[ \t]*\r?\n\s*")
ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")


def scrub(record):
    """A logging filter: no client IP is written anywhere (README, visitors without cookies)."""
    if record.name == "gunicorn.error":
        invalid = INVALID_REQUEST.match(str(record.msg))
        if invalid:
            # what the client sent goes in as an argument: read as the message, its key=value
            # text would become JSON fields of its choosing, and 8 KB of letters cost 0.5 s to read
            sent = CREDENTIALS.sub(r"\1***", invalid[1])
            record.msg, record.args = "Invalid request from a client: %s", (sent,)
    elif isinstance(record.msg, str):      # werkzeug styles its start banner in the message itself
        record.msg = ANSI_STYLE.sub("", WERKZEUG_ADDRESS.sub("a client", record.msg, count=1))
        if isinstance(record.args, tuple):      # werkzeug styles the request line, an argument
            record.args = tuple(ANSI_STYLE.sub("", arg) if isinstance(arg, str) else arg
                                for arg in record.args)
    return True


def message_fields(message, args):
    """The key=value pairs of a %-style message with its args, as {key: logged value}."""
    fields = {key: value for key, value in LITERAL.findall(message)}
    position = 0
    for match in CONVERSION.finditer(message):
        key, name, precision, kind = match.groups()
        if kind == "%":
            continue
        if isinstance(args, Mapping):
            value = args.get(name)
        elif position < len(args):
            value, position = args[position], position + 1
        else:
            break
        if key:
            fields[key] = value[:int(precision)] if precision and isinstance(value, str) else value
    return fields


def utc_time(created):
    return datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record):
        line = {"time": utc_time(record.created), "level": record.levelname, "logger": record.name,
                "pid": record.process, "message": self.message(record)}
        line.update((key, value) for key, value in self.fields(record).items() if key not in RESERVED)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()

    def message(self, record):
        return record.getMessage()

    def fields(self, record):
        if not isinstance(record.msg, str):
            return {}
        args = record.args if isinstance(record.args, (tuple, Mapping)) else ()
        return message_fields(record.msg, args)


# gunicorn access-log atom -> field; the client address (atom h) is left out on
# purpose: no client IP is written anywhere (see README, visitors without cookies)
ACCESS_FIELDS = {"method": "m", "path": "U", "query": "q", "status": "s", "bytes": "B",
                 "protocol": "H", "referrer": "f", "user_agent": "a"}


class AccessJsonFormatter(JsonFormatter):
    """gunicorn's access log: a record's args are its request atoms."""

    def message(self, record):
        fields = self.fields(record)
        return f"{fields['method']} {fields['path']} {fields['status']}"

    def fields(self, record):
        atoms = record.args
        fields = {name: _unescaped(atoms.get(atom)) for name, atom in ACCESS_FIELDS.items()}
        fields["status"] = int(fields["status"]) if str(fields["status"]).isdigit() else fields["status"]
        fields["duration_ms"] = atoms.get("D", 0) / 1000     # D: microseconds
        return fields


def _unescaped(value):
    """gunicorn escapes quotes in atoms and writes '-' for a missing header; undo both."""
    if value == "-":
        return None
    return value.replace('\\"', '"') if isinstance(value, str) else value
