"""Query-string parameters of the report endpoints, checked one by one.

Each method returns a clean value or raises InvalidParameter with a message
that names the parameter.
"""
import re
from datetime import date, datetime, timedelta, timezone

from reports import Period
from rollups import PROPERTIES, is_property

MAX_LIMIT = 1000
MAX_HOURLY_DAYS = 31
INTERVALS = ("day", "hour")
# date.fromisoformat alone also takes week dates (2025-W01-1) and trailing text (20250101xx)
DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)


class InvalidParameter(ValueError):
    pass


def parse_day(text):
    """The day text writes as YYYY-MM-DD, or None if it is not one (or does not exist)."""
    try:
        return date.fromisoformat(text) if DATE.fullmatch(text) else None
    except ValueError:
        return None


def _date(text, name):
    day = parse_day(text)
    if day is not None:
        return day
    if name == "date":
        raise InvalidParameter("Invalid date format. Expected YYYY-MM-DD")
    raise InvalidParameter(f"Invalid {name}: expected a date as YYYY-MM-DD")


class QueryParams:
    def __init__(self, args, config):
        self.args = args
        self.max_days = config.report_max_days

    def site_id(self):
        site_id = self.args.get("site_id")
        if not site_id:
            raise InvalidParameter("Missing required parameter: site_id")
        if "\x00" in site_id:        # no event has one, and PostgreSQL text cannot hold it
            raise InvalidParameter("Invalid site_id: contains a NUL character")
        return site_id

    def limit(self):
        text = self.args.get("limit")
        if text is None:
            return 10
        # the length first: int() refuses strings of over 4,300 digits with a ValueError
        if not (text.isascii() and text.isdigit() and len(text) <= 9) or not 1 <= int(text) <= MAX_LIMIT:
            raise InvalidParameter(f"Invalid limit: expected a whole number from 1 to {MAX_LIMIT}")
        return int(text)

    def period(self):
        """date, or from and to (inclusive UTC days), or neither for all time."""
        day, start, end = (self.args.get(name) for name in ("date", "from", "to"))
        if day is not None:
            if start is not None or end is not None:
                raise InvalidParameter("Invalid date: give either date or from and to, not both")
            day = _date(day, "date")
            return Period(day, day)
        if start is None and end is None:
            return Period()
        for name, value in (("from", start), ("to", end)):
            if value is None:
                raise InvalidParameter(f"Missing required parameter: {name} (from and to go together)")
        return self._checked(_date(start, "from"), _date(end, "to"), self.max_days)

    def series_period(self, interval):
        """Like period(), but never all time: by default the last 30 days (or fewer if that
        is the most REPORT_MAX_DAYS allows), or today by the hour."""
        period = self.period()
        if period.all_time:
            today = datetime.now(timezone.utc).date()
            days = min(30, self.max_days) if interval == "day" else 1
            period = Period(today - timedelta(days=days - 1), today)
        if interval == "hour":
            self._checked(period.start, period.end, MAX_HOURLY_DAYS, "with interval=hour")
        return period

    def interval(self):
        interval = self.args.get("interval", "day")
        if interval not in INTERVALS:
            raise InvalidParameter("Invalid interval: expected day or hour")
        return interval

    def property(self):
        prop = self.args.get("property")
        if not prop:
            raise InvalidParameter("Missing required parameter: property")
        if not is_property(prop):
            raise InvalidParameter(f"Invalid property: expected one of {', '.join(PROPERTIES)} "
                                   f"or props.<name> of a custom-event property")
        return prop

    @staticmethod
    def period_fields(period):
        return {"from": period.start and period.start.isoformat(),
                "to": period.end and period.end.isoformat()}

    @staticmethod
    def _checked(start, end, max_days, context=""):
        if start > end:
            raise InvalidParameter("Invalid to: it is before from")
        days = (end - start).days + 1
        if days > max_days:
            raise InvalidParameter(f"Invalid to: the range from..to is {days} days, "
                                   f"at most {max_days} {context}".rstrip())
        return Period(start, end)
