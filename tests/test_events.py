"""One set of rules for what a valid event is, whichever way a batch is checked.

A batch of valid events is checked and encoded in one pass
(encode_valid_events); anything it turns down is checked event by event
(validate_event), which names the problem. The two must agree on every input.
"""
from datetime import datetime, timezone

import orjson
import pytest

from events import InvalidEvent, encode_event, encode_valid_events, new_event_ids, validate_event

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
BASE = {"site_id": "s", "event_type": "page_view"}

EVENTS = [
    BASE,
    {**BASE, "path": "/a", "user_id": "u1", "timestamp": "2025-05-31T10:00:00.000Z"},
    {**BASE, "path": "", "user_id": ""},
    {**BASE, "path": None, "user_id": None, "timestamp": None},
    {**BASE, "timestamp": ""},
    {**BASE, "timestamp": "2025-03-01T01:30:00+02:00"},
    {**BASE, "timestamp": "2025-03-01T01:30:00"},
    {**BASE, "timestamp": "2025-03-01"},
    {**BASE, "timestamp": "2025-W01-1T12:00:00.000Z"},
    {**BASE, "timestamp": "2025-05-31T10:00:00,000Z"},
    {**BASE, "timestamp": "1999-12-31T23:59:59.999Z"},
    {**BASE, "timestamp": "2000-01-01T00:00:00.000Z"},
    {**BASE, "timestamp": "2025-06-02T12:00:00.000Z"},
    {**BASE, "timestamp": "2025-06-02T12:00:00.001Z"},
    {**BASE, "timestamp": "2025-02-30T00:00:00.000Z"},
    {**BASE, "timestamp": "yesterday"},
    {**BASE, "timestamp": 1700000000},
    {**BASE, "site_id": "   "},
    {**BASE, "site_id": "\u3000"},
    {**BASE, "site_id": ""},
    {**BASE, "site_id": None},
    {**BASE, "site_id": 1},
    {"event_type": "page_view"},
    {"site_id": "s"},
    {**BASE, "event_type": ["x"]},
    {**BASE, "site_id": "a\x00b"},
    {**BASE, "event_type": "\x00"},
    {**BASE, "path": "/\x00"},
    {**BASE, "user_id": "\x00"},
    {**BASE, "path": {"a": 1}},
    {**BASE, "user_id": 7},
    {**BASE, "site_id": "s" * 256, "event_type": "e" * 256, "user_id": "u" * 256, "path": "/" * 2048},
    {**BASE, "site_id": "s" * 257},
    {**BASE, "event_type": "e" * 257},
    {**BASE, "user_id": "u" * 257},
    {**BASE, "path": "/" * 2049},
    {**BASE, "site_id": "sité", "path": "/ünï/😀\u2028\n\r\t\"\\"},
    {**BASE, "extra": {"deep": [1, 2, {"x": None}]}},
    "page_view",
    ["s", "page_view"],
    None,
]


def stored(line):
    """A queue line without its id, which is new on every call."""
    event = orjson.loads(line)
    assert len(event.pop("id")) == 30
    return event


def checked_one_by_one(event, sites=frozenset()):
    try:
        return stored(encode_event(validate_event(event, NOW, sites)))
    except InvalidEvent:
        return None


# no SITES; and SITES listing s and some of the ids above, but not "sité" nor s * 256
SITES = [frozenset(), frozenset({"s", "   ", "a\x00b", "s" * 257, "Sité"})]


@pytest.mark.parametrize("sites", SITES, ids=["any site", "SITES"])
@pytest.mark.parametrize("event", EVENTS, ids=[repr(e)[:60] for e in EVENTS])
def test_a_batch_checked_at_once_stores_exactly_what_one_by_one_would(event, sites):
    lines = encode_valid_events([BASE, event], NOW, sites)
    expected = checked_one_by_one(event, sites)
    if expected is None:
        assert lines is None
    else:
        assert [stored(line) for line in lines] == [checked_one_by_one(BASE, sites), expected]


def test_an_event_of_a_site_not_in_sites_is_named():
    with pytest.raises(InvalidEvent, match="^Unknown site_id: t$"):
        validate_event({**BASE, "site_id": "t"}, NOW, frozenset({"s"}))
    assert encode_valid_events([BASE, {**BASE, "site_id": "t"}], NOW, frozenset({"s"})) is None


def test_one_bad_event_turns_down_the_whole_batch():
    assert encode_valid_events([BASE] * 50 + [{**BASE, "site_id": 5}] + [BASE] * 49, NOW) is None


def test_each_event_of_a_batch_is_one_line_in_order_with_its_own_id():
    batch = [{**BASE, "path": f"/{n}"} for n in range(1000)]
    lines = encode_valid_events(batch, NOW)
    assert [stored(line)["path"] for line in lines] == [f"/{n}" for n in range(1000)]
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    ids = [orjson.loads(line)["id"] for line in lines]
    assert ids == sorted(ids) and len(set(ids)) == 1000


def test_ids_of_batches_taken_together_never_repeat():
    ids = [event_id for _ in range(200) for event_id in new_event_ids(1000)]
    assert len(set(ids)) == len(ids)


def test_an_iso_week_date_is_stored_as_the_calendar_date_it_names():
    event = validate_event({**BASE, "timestamp": "2025-W01-1T12:00:00.000Z"}, NOW)
    assert event["timestamp"] == "2024-12-30T12:00:00.000Z"


def both_ways(timestamp):
    """The timestamp stored for an event checked alone and in a batch."""
    event = {**BASE, "timestamp": timestamp}
    batch = encode_valid_events([event], NOW)
    return validate_event(event, NOW)["timestamp"], batch and stored(batch[0])["timestamp"]


@pytest.mark.parametrize("timestamp, stored_as", [
    ("2000-01-01T00:00:00Z", "2000-01-01T00:00:00.000Z"),             # the first moment taken
    ("2000-01-01T01:00:00+01:00", "2000-01-01T00:00:00.000Z"),
    ("2025-06-02T12:00:00.000Z", "2025-06-02T12:00:00.000Z"),         # a day ahead of NOW: the last
    ("2025-06-02T14:00:00+02:00", "2025-06-02T12:00:00.000Z"),
    ("2025-05-31T10:00:00,250Z", "2025-05-31T10:00:00.250Z"),         # a decimal comma, same width
    ("2025-05-31 10:00:00.000Z", "2025-05-31T10:00:00.000Z"),         # a space for the T, same width
    ("2025-05-31T10:00:00.123456Z", "2025-05-31T10:00:00.123Z"),
])
def test_a_timestamp_from_2000_to_a_day_ahead_is_stored_in_the_one_fixed_width_form(timestamp, stored_as):
    assert both_ways(timestamp) == (stored_as, stored_as)


# ISO 8601 forms Python 3.11's datetime.fromisoformat does not read (3.14 reads 24:00 alone)
@pytest.mark.parametrize("timestamp, stored_as", [
    ("2025-05-31T24:00:00Z", "2025-06-01T00:00:00.000Z"),             # the end of a day: the next midnight
    ("2025-05-31T24:00:00.000Z", "2025-06-01T00:00:00.000Z"),         # as wide as the stored form
    ("2025-05-31T24:00+02:00", "2025-05-31T22:00:00.000Z"),
    ("2025-05-31T24Z", "2025-06-01T00:00:00.000Z"),
    ("20250531T240000Z", "2025-06-01T00:00:00.000Z"),
    ("2016-12-31T23:59:60Z", "2016-12-31T23:59:59.999Z"),             # a leap second, in its own UTC day
    ("2016-12-31T23:59:60.000Z", "2016-12-31T23:59:59.999Z"),
    ("2017-01-01T05:29:60.5+05:30", "2016-12-31T23:59:59.999Z"),
    ("20161231T235960Z", "2016-12-31T23:59:59.999Z"),
    ("2025-151T10:00:00Z", "2025-05-31T10:00:00.000Z"),               # an ordinal date
    ("2025151T100000Z", "2025-05-31T10:00:00.000Z"),
    ("2024-366", "2024-12-31T00:00:00.000Z"),
    ("2025-05-31T10:00:00z", "2025-05-31T10:00:00.000Z"),             # a lowercase z, as RFC 3339 allows
    ("2025-05-31t10:00:00.000z", "2025-05-31T10:00:00.000Z"),
    ("2025-05-31T10.5z", "2025-05-31T10:30:00.000Z"),
    ("2016-12-31T23:59:60z", "2016-12-31T23:59:59.999Z"),
])
def test_iso_8601_forms_for_midnight_leap_seconds_and_days_of_the_year_are_read(timestamp, stored_as):
    assert both_ways(timestamp) == (stored_as, stored_as)


# datetime.fromisoformat reads 10.5 (half past ten) as 10:00:00.5, a fraction of a second
@pytest.mark.parametrize("timestamp, stored_as", [
    ("2025-05-31T10.5Z", "2025-05-31T10:30:00.000Z"),
    ("2025-05-31T10,25Z", "2025-05-31T10:15:00.000Z"),
    ("2025-05-31T10.5+02:00", "2025-05-31T08:30:00.000Z"),
    ("2025-05-31T10:30.5Z", "2025-05-31T10:30:30.000Z"),
    ("20250531T1030.25Z", "2025-05-31T10:30:15.000Z"),
    ("2025-05-31T23.999999", "2025-05-31T23:59:59.996Z"),
    ("2025-05-31T23.99999999999999999999", "2025-05-31T23:59:59.999Z"),    # still in its hour and day
    ("2025-151T10.5Z", "2025-05-31T10:30:00.000Z"),
    ("2025-05-31T10:30:00.5Z", "2025-05-31T10:30:00.500Z"),           # of a second, as before
])
def test_a_decimal_fraction_of_an_hour_or_a_minute_is_that_much_of_it(timestamp, stored_as):
    assert both_ways(timestamp) == (stored_as, stored_as)


@pytest.mark.parametrize("timestamp", [
    "2025-05-31T24:00:01Z", "2025-05-31T24:01:00Z", "2025-05-31T24:00:00.001Z", "2025-05-31T25:00:00Z",
    "2016-12-31T23:58:60Z", "2016-12-31T23:59:61Z", "2025-000T10:00:00Z", "2025-366T10:00:00Z",
])
def test_a_time_or_day_that_does_not_exist_is_refused(timestamp):
    with pytest.raises(InvalidEvent, match="^Invalid timestamp: expected ISO 8601"):
        validate_event({**BASE, "timestamp": timestamp}, NOW)
    assert encode_valid_events([{**BASE, "timestamp": timestamp}], NOW) is None


def test_the_end_of_the_last_day_python_knows_is_too_far_ahead():
    with pytest.raises(InvalidEvent, match="^Invalid timestamp: more than one day in the future$"):
        validate_event({**BASE, "timestamp": "9999-12-31T24:00:00Z"}, NOW)
    assert encode_valid_events([{**BASE, "timestamp": "9999-12-31T24:00:00Z"}], NOW) is None


@pytest.mark.parametrize("timestamp, error", [
    ("1999-12-31T23:59:59.999Z", "before 2000-01-01"),
    ("2000-01-01T00:59:59+01:00", "before 2000-01-01"),
    ("2025-06-02T12:00:00.001Z", "more than one day in the future"),
    ("2025-06-02T13:00:00+00:59", "more than one day in the future"),
])
def test_a_timestamp_before_2000_or_over_a_day_ahead_is_refused(timestamp, error):
    with pytest.raises(InvalidEvent, match=f"^Invalid timestamp: {error}$"):
        validate_event({**BASE, "timestamp": timestamp}, NOW)
    assert encode_valid_events([{**BASE, "timestamp": timestamp}], NOW) is None
