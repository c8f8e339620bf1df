"""What a valid event is: parsing, validation and normalisation.

The API validates every event before it is queued, and the processor checks
every queued line again before it is stored, so both import these rules.
"""
import random
import re
import time
from datetime import date, datetime, timedelta, timezone
from typing import Annotated, Optional

import msgspec
import orjson

EVENT_COLUMNS = ("site_id", "event_type", "path", "user_id", "timestamp")   # a stored row
MAX_LENGTHS = {"site_id": 256, "event_type": 256, "user_id": 256, "path": 2048}
OLDEST_TIMESTAMP = datetime(2000, 1, 1, tzinfo=timezone.utc)
FUTURE_TOLERANCE = timedelta(days=1)
# ISO 8601 forms that datetime.fromisoformat does not read on Python 3.11 (3.14 reads 24:00 itself):
# 24:00 for the end of a day, a leap second (hh:59:60), an ordinal date (2025-151) and a lowercase z
END_OF_DAY = re.compile(r"(?<=[Tt ])24(?=(?::?00(?::?00(?:[.,]0+)?)?)?(?:Z|[+-]|$))", re.ASCII)
LEAP_SECOND = re.compile(r"([Tt ]\d\d:?\d\d:?)60(?:[.,]\d+)?(?=Z|[+-]|$)", re.ASCII)
ORDINAL_DATE = re.compile(r"^(\d{4})-?(\d{3})(?=[Tt ]|$)", re.ASCII)
# what JavaScript's Date.toISOString() sends: already the stored form, kept as it is (not so
# hour 24 or second 60, which Python 3.14 reads as 00:00 of the next day and 3.11 not at all)
STORED_FORM = re.compile(r"\d{4}-\d\d-\d\dT(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{3}Z", re.ASCII)
# a decimal fraction of an hour (10.5) or a minute (10:30.5), which fromisoformat reads as
# one of a second
UNIT_FRACTION = re.compile(r"([Tt ]\d\d(?::?\d\d)?)([.,]\d+)(?=Z|[+-]|$)", re.ASCII)


class InvalidEvent(ValueError):
    """The message names the problem and is safe to show to the client."""


UTF8_BOM = b"\xef\xbb\xbf"


def parse_json(body):
    """Parse a request body as JSON whatever its Content-Type says.

    orjson rejects invalid UTF-8, lone surrogates, NaN and nesting deeper
    than 1,024 levels, so none of those can reach the queue. A UTF-8 byte
    order mark before the JSON is ignored, as RFC 8259 allows: Windows tools
    (Notepad, PowerShell 5's Out-File) begin the files they save with one.
    """
    if body.startswith(UTF8_BOM):
        body = body[len(UTF8_BOM):]
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidEvent("Invalid JSON") from None


def new_event_id():
    """A unique id given when an event is accepted: microseconds since 1970, then 64 random bits.

    Time-ordered, so the unique index that makes redelivered events harmless
    grows at its end instead of everywhere. The random bits come from the
    random module, seeded from the OS at start and again in every forked
    process, without a system call per event.
    """
    return f"{time.time_ns() // 1000:014x}{random.getrandbits(64):016x}"


def new_event_ids(count):
    """Unique ids for events accepted together: one clock reading, consecutive random bits.

    Two batches of the same microsecond collide only if their random ranges
    overlap, about one chance in 2**53 for batches of 1,000.
    """
    stamp = f"{time.time_ns() // 1000:014x}"
    first = random.getrandbits(63)
    return [f"{stamp}{first + offset:016x}" for offset in range(count)]


def format_timestamp(moment):
    """ISO 8601 in UTC with a Z, fixed width, so text order is time order."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def parse_timestamp(value, now):
    if not isinstance(value, str):
        raise InvalidEvent("Invalid field type: timestamp must be a string")
    if "\x00" in value:        # fromisoformat reads only up to it
        raise InvalidEvent("Invalid field: timestamp contains a NUL character")
    stored_form = len(value) == 24 and STORED_FORM.fullmatch(value)
    try:
        moment = datetime.fromisoformat(value) if stored_form else _read_iso(value)
    except ValueError:
        raise InvalidEvent("Invalid timestamp: expected ISO 8601, "
                           "for example 2025-01-31T12:00:00Z") from None
    except OverflowError:       # the end of 9999-12-31
        raise InvalidEvent("Invalid timestamp: more than one day in the future") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    if moment < OLDEST_TIMESTAMP:
        raise InvalidEvent("Invalid timestamp: before 2000-01-01")
    if moment > now + FUTURE_TOLERANCE:
        raise InvalidEvent("Invalid timestamp: more than one day in the future")
    return value if stored_form else format_timestamp(moment)


def _read_iso(value):
    """The moment value names, in any ISO 8601 form that datetime.fromisoformat reads,
    or one of the others: 24:00 is the next day's midnight, and a leap second
    (23:59:60 UTC) is kept as the last millisecond before it, in its own UTC day
    and hour (the stored form has no :60). A fraction of an hour or a minute is
    that much of it, not the fraction of a second fromisoformat makes of it."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return _read_rewritten(value)       # only then: rewriting every timestamp would cost more
    # such a fraction is read as one of second 0
    return _with_unit_fraction(value, moment) if moment.microsecond and not moment.second else moment


def _read_rewritten(value):
    text = value[:-1] + "Z" if value.endswith("z") else value      # RFC 3339 allows a lowercase z
    text = ORDINAL_DATE.sub(_calendar_date, text, count=1)
    text, leap_second = LEAP_SECOND.subn(r"\g<1>59.999", text, count=1)
    text, end_of_day = END_OF_DAY.subn("00", text, count=1)
    if text == value:
        raise ValueError(f"not ISO 8601: {value!r}")
    moment = _with_unit_fraction(text, datetime.fromisoformat(text))
    if leap_second and _utc_minute_of_day(moment) != 23 * 60 + 59:
        raise ValueError("a leap second is 23:59:60 UTC")
    return moment + timedelta(days=1) if end_of_day else moment


def _with_unit_fraction(text, moment):
    """moment, read by fromisoformat from text, with a fraction of an hour or a minute in text
    counted as that much of it."""
    fraction = UNIT_FRACTION.search(text)
    if fraction is None:
        return moment
    unit = 3_600_000_000 if len(fraction[1]) == 3 else 60_000_000      # microseconds
    digits = fraction[2][1:13]
    whole = datetime.fromisoformat(text[:fraction.end(1)] + text[fraction.end():])
    # cut, never rounded: 23.99999999999 is still in hour 23
    return whole + timedelta(microseconds=unit * int(digits) // 10 ** len(digits))


def _utc_minute_of_day(moment):
    """Without astimezone, which fails on the first and last days Python knows."""
    offset = moment.utcoffset() or timedelta(0)
    return (moment.hour * 60 + moment.minute - offset // timedelta(minutes=1)) % (24 * 60)


def _calendar_date(match):
    year, day = int(match[1]), int(match[2])
    moment = date.fromordinal(date(year, 1, 1).toordinal() + day - 1)     # ValueError before 0001-01-01
    if moment.year != year:
        raise ValueError(f"{year} has no day {day}")
    return moment.isoformat()


def _check_string(name, value, required):
    if type(value) is not str:
        raise InvalidEvent(f"Invalid field type: {name} must be a string")
    if required and not value.strip():
        raise InvalidEvent(f"Invalid field: {name} must not be empty")
    if len(value) > MAX_LENGTHS[name]:
        raise InvalidEvent(f"Field too long: {name} exceeds {MAX_LENGTHS[name]} characters")
    if "\x00" in value:
        raise InvalidEvent(f"Invalid field: {name} contains a NUL character")


def validate_event(data, now=None, sites=frozenset()):
    """Return the normalised event dict, or raise InvalidEvent naming the problem.

    Unknown fields are dropped. Empty optional strings mean "not given".
    A missing timestamp is the time of receipt. The event gets its unique id here.
    sites, when not empty, are the only site ids accepted (SITES).
    """
    if type(data) is not dict:
        raise InvalidEvent("Invalid event: expected a JSON object")
    site_id, event_type = data.get("site_id"), data.get("event_type")
    if site_id is None:
        raise InvalidEvent("Missing required field: site_id")
    _check_string("site_id", site_id, required=True)
    if sites and site_id not in sites:
        raise InvalidEvent(f"Unknown site_id: {site_id}")
    if event_type is None:
        raise InvalidEvent("Missing required field: event_type")
    _check_string("event_type", event_type, required=True)
    path, user_id = data.get("path"), data.get("user_id")
    if path is not None:
        _check_string("path", path, required=False)
    if user_id is not None:
        _check_string("user_id", user_id, required=False)
    now = now or datetime.now(timezone.utc)
    timestamp = data.get("timestamp")
    if timestamp is None or timestamp == "":
        timestamp = format_timestamp(now)
    else:
        timestamp = parse_timestamp(timestamp, now)
    return {"id": new_event_id(), "site_id": site_id, "event_type": event_type,
            "path": path or None, "user_id": user_id or None, "timestamp": timestamp}


class SubmittedEvent(msgspec.Struct):
    """The fields of a client's event with their types and lengths, checked in C."""
    site_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_LENGTHS["site_id"])]
    event_type: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_LENGTHS["event_type"])]
    path: Optional[Annotated[str, msgspec.Meta(max_length=MAX_LENGTHS["path"])]] = None
    user_id: Optional[Annotated[str, msgspec.Meta(max_length=MAX_LENGTHS["user_id"])]] = None
    timestamp: Optional[str] = None


class QueuedEvent(msgspec.Struct):
    """One queue line; the field order is the order validate_event's dict has."""
    id: str
    site_id: str
    event_type: str
    path: Optional[str]
    user_id: Optional[str]
    timestamp: str


_SUBMITTED_BATCH = list[SubmittedEvent]
_LINE_ENCODER = msgspec.json.Encoder()


def encode_valid_events(items, now, sites=frozenset()):
    """Queue lines for a batch of parsed events if every one is valid, else None.

    The same rules as validate_event, applied to the whole batch at once (the
    types and lengths by msgspec, in C) for about half the cost of checking
    event by event. It never names a problem: when it gives None, validate_event, event by event,
    finds the first bad one and says what is wrong with it.
    """
    try:
        submitted = msgspec.convert(items, _SUBMITTED_BATCH)
    except msgspec.ValidationError:
        return None
    received = format_timestamp(now)
    queued = []
    for event, event_id in zip(submitted, new_event_ids(len(submitted))):
        site_id, event_type, path, user_id = event.site_id, event.event_type, event.path, event.user_id
        if not (site_id.strip() and event_type.strip()) or "\x00" in site_id or "\x00" in event_type \
                or (path and "\x00" in path) or (user_id and "\x00" in user_id):
            return None
        if sites and site_id not in sites:
            return None
        try:
            timestamp = parse_timestamp(event.timestamp, now) if event.timestamp else received
        except InvalidEvent:
            return None
        queued.append(QueuedEvent(event_id, site_id, event_type, path or None, user_id or None, timestamp))
    return _LINE_ENCODER.encode_lines(queued).splitlines(keepends=True)


def encode_event(event):
    """One queue line, newline included."""
    return orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)


def row_from_line(line):
    """A queued line as an events row of EVENT_COLUMNS (see parse_line)."""
    return parse_line(line)[0]


def parse_line(line):
    """A queued line as (events row, the parsed dict), or InvalidEvent with the reason.

    Lines were validated before they were queued, so this only guards the
    store against lines that are not ours (a torn write, a stray edit).
    """
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        raise InvalidEvent(f"not JSON: {error}") from None
    if type(data) is not dict:
        raise InvalidEvent("not a JSON object")
    try:
        row = (data["site_id"], data["event_type"], data["path"], data["user_id"], data["timestamp"])
    except KeyError as error:
        raise InvalidEvent(f"missing field {error.args[0]}") from None
    site_id, event_type, path, user_id, timestamp = row
    if not (type(site_id) is str and site_id and type(event_type) is str and event_type):
        raise InvalidEvent("site_id and event_type must be non-empty strings")
    if not ((path is None or type(path) is str) and (user_id is None or type(user_id) is str)):
        raise InvalidEvent("path and user_id must be strings or null")
    if not (type(timestamp) is str and len(timestamp) == 24 and timestamp[-1] == "Z"):
        raise InvalidEvent("timestamp is not in stored form")
    _check_kept_as_queued(data, row, line)
    return row, data


# What the store keeps of a line as it is, beside the row (see enrich.py), and of what type
# the APIs queue it. Anything else, or a NUL that PostgreSQL text cannot hold, would fail the
# write of its batch on every retry: the processor would store nothing more.
KEPT_TEXTS = ("id", "visitor_id", "referrer")
KEPT_NUMBERS = ("scroll_depth", "engaged_ms")
MAX_KEPT_NUMBER = 2**31 - 1            # PostgreSQL's INTEGER


def _check_kept_as_queued(data, row, line):
    for name in KEPT_TEXTS:
        value = data.get(name)
        if value is not None and type(value) is not str:
            raise InvalidEvent(f"{name} must be a string or null")
    for name in KEPT_NUMBERS:
        value = data.get(name)
        if value is not None and not (type(value) is int and 0 <= value <= MAX_KEPT_NUMBER):
            raise InvalidEvent(f"{name} must be a whole number from 0 to {MAX_KEPT_NUMBER} or null")
    props = data.get("props")
    if props is not None and (type(props) is not dict or not all(type(value) is str
                                                                for value in props.values())):
        raise InvalidEvent("props must be an object of strings or null")
    # JSON writes a NUL as \u0000: only a line with those bytes can hold one
    if b"\\u0000" in line and any("\x00" in text for text in _kept_texts(data, row)):
        raise InvalidEvent("a field contains a NUL character")


def _kept_texts(data, row):
    props = data.get("props") or {}
    yield from (value for value in row if value is not None)
    yield from (data.get(name) or "" for name in KEPT_TEXTS)
    yield from props
    yield from props.values()
