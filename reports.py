"""The questions the API answers, asked of the rollups.

Every report has a twin over the raw events table (RawReports): the tests
check that both give the same answers, and the benchmark measures both.
Dates are inclusive UTC days; a report over all time has start = end = None.
"""
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from rollups import COUNTED, PROP_PREFIX, USER, property_expression


@dataclass(frozen=True)
class Period:
    start: date = None
    end: date = None

    @property
    def all_time(self):
        return self.start is None

    def hour_bounds(self):
        return {"first_hour": f"{self.start.isoformat()}T00", "last_hour": f"{self.end.isoformat()}T23"}

    def day_bounds(self):
        return {"first_day": self.start.isoformat(), "last_day": self.end.isoformat()}

    def timestamp_bounds(self):
        # inclusive: stored timestamps are fixed-width milliseconds (events.format_timestamp),
        # and the day after the last may not exist (9999-12-31)
        return {"first_ts": f"{self.start.isoformat()}T00:00:00.000Z",
                "last_ts": f"{self.end.isoformat()}T23:59:59.999Z"}


# counters may be kept in several rows (per processor shard); a sum of integers stays one
VIEWS, EVENTS, USERS = (f"CAST(sum({column}) AS BIGINT)" for column in ("views", "events", "users"))


def buckets(period, interval):
    """Every bucket key of the period, in order: days 'YYYY-MM-DD' or hours 'YYYY-MM-DDTHH'."""
    start = datetime.combine(period.start, datetime.min.time(), tzinfo=timezone.utc)
    step = timedelta(days=1) if interval == "day" else timedelta(hours=1)
    count = ((period.end - period.start).days + 1) * (1 if interval == "day" else 24)
    width = 10 if interval == "day" else 13
    # isoformat, not strftime: %Y gives "55" rather than "0055" for early years
    return [(start + step * i).isoformat()[:width] for i in range(count)]


def bucket_label(key):
    return key if len(key) == 10 else f"{key}:00:00Z"


def _rows(connection, sql, params):
    return connection.execute(sql, params).fetchall()


def _one(connection, sql, params):
    row = connection.execute(sql, params).fetchone()
    return row[0] if row and row[0] is not None else 0


def _ranking(views_only):
    """top_paths: page views only, ties by path; breakdowns: by views, then events, then value."""
    if views_only:
        return "AND views > 0 AND value != '' ORDER BY views DESC, value LIMIT :limit"
    return "ORDER BY views DESC, events DESC, value LIMIT :limit"


def _value(text):
    return text if text != "" else None


class _Reports:
    """The report shapes; subclasses say where the numbers come from.

    first_day: the first day whose per-hour and per-day rows are kept
    (ROLLUP_RETENTION_DAYS); the days before it read as empty. Retention
    deletes them table by table, window by window, so until its pass ends
    some of their rows are gone and some are not: read, they would make one
    answer disagree with itself (top paths over more views than the total).
    """

    def __init__(self, connection, first_day=None):
        self.connection = connection
        self.first_day = first_day

    def _kept(self, period):
        """The part of the period whose rows are kept; a period before first_day reads nothing
        (from after to: no BETWEEN holds). All time reads the all-time totals, never deleted."""
        if self.first_day is None or period.all_time or period.start >= self.first_day:
            return period
        return Period(self.first_day, period.end)

    def stats(self, site_id, period, limit=10):
        period = self._kept(period)
        views, users = self.totals(site_id, period)
        top = self.top_values(site_id, "path", period, limit, views_only=True)
        return {"total_views": views, "unique_users": users,
                "top_paths": [{"path": value, "views": views} for value, views, _ in top]}

    def timeseries(self, site_id, period, interval):
        kept = self._kept(period)
        counts = dict(self.bucket_views(site_id, kept, interval))
        users = dict(self.bucket_users(site_id, kept, interval))
        return [{"date": bucket_label(key), "views": counts.get(key, 0),
                 "unique_users": users.get(key, 0)} for key in buckets(period, interval)]

    def sites(self):
        """Every site with counted events, by site_id, with its all-time totals."""
        return [{"site_id": site_id, "total_views": views, "unique_users": users}
                for site_id, views, users in self.site_rows()]

    def breakdown(self, site_id, prop, period, limit=10):
        period = self._kept(period)
        top = self.top_values(site_id, prop, period, limit)
        users = self.value_users(site_id, prop, period, [value for value, _, _ in top])
        return [{"value": _value(value), "views": views, "events": events,
                 "unique_users": users.get(value, 0)} for value, views, events in top]

    def prop_keys(self, site_id, period, limit=10):
        """The names of the custom-event props counted in the period, in byte order."""
        return [name[len(PROP_PREFIX):] for (name,) in self.prop_names(site_id, self._kept(period), limit)]


class RollupReports(_Reports):
    def __init__(self, connection, sharded=False, value_key="{}", first_day=None):
        super().__init__(connection, first_day)
        # sharded: counters are kept in one row per processor shard and must be summed;
        # otherwise the values of all time or of one day are one row each, and skipping
        # the GROUP BY makes their top paths (thousands of values) several times faster
        self.sharded = sharded
        # value_key: the SQL of the value tables' key for a value ({}), so that a value
        # is found by its index (PostgreSQL keys long values by a digest)
        self.value_key = value_key

    def totals(self, site_id, period):
        if period.all_time:
            row = self.connection.execute(
                f"SELECT {VIEWS}, {USERS} FROM site_totals WHERE site_id = :site",
                {"site": site_id}).fetchone()
            return (row[0] or 0, row[1] or 0)
        params = {"site": site_id, **period.hour_bounds(), **period.day_bounds()}
        views = _one(self.connection, f"SELECT {VIEWS} FROM hourly_totals WHERE site_id = :site "
                     "AND hour BETWEEN :first_hour AND :last_hour", params)
        if period.start == period.end:      # kept at write time
            users = _one(self.connection, f"SELECT {USERS} FROM daily_totals WHERE site_id = :site "
                         "AND day = :first_day", params)
        else:
            # GROUP BY sorts the ids, ~20% faster here than count(DISTINCT)'s temporary B-tree
            users = _one(self.connection, "SELECT count(*) FROM (SELECT user_id FROM daily_users "
                         "WHERE site_id = :site AND day BETWEEN :first_day AND :last_day "
                         "GROUP BY user_id) AS u", params)
        return views, users

    def site_rows(self):
        return _rows(self.connection, f"SELECT site_id, {VIEWS}, {USERS} FROM site_totals "
                     "GROUP BY site_id ORDER BY site_id", {})

    def top_values(self, site_id, prop, period, limit, views_only=False):
        params = {"site": site_id, "property": prop, "limit": limit}
        if period.all_time:
            table, days = "total_values", ""
        else:
            # for one day, an equality lets the ranked index give the order
            table, days = "daily_values", ("AND day = :first_day" if period.start == period.end
                                           else "AND day BETWEEN :first_day AND :last_day")
            params.update(period.day_bounds())
        if self.sharded or period.start != period.end:
            counts, group = f"{VIEWS} AS views, {EVENTS} AS events", "GROUP BY value"
        else:       # one row per value: a GROUP BY would only cost time
            counts, group = "views, events", ""
        sql = (f"SELECT value, {counts} FROM {table} WHERE site_id = :site AND property = :property "
               f"{days} {group}")
        return _rows(self.connection, f"SELECT * FROM ({sql}) AS v WHERE TRUE {_ranking(views_only)}",
                     params)

    def value_users(self, site_id, prop, period, values):
        if not values:
            return {}
        params = {"site": site_id, "property": prop}
        params.update({f"v{i}": value for i, value in enumerate(values)})
        if not period.all_time:
            days = "AND day BETWEEN :first_day AND :last_day"
            params.update(period.day_bounds())
        elif self.first_day is not None:     # all time, counted over the per-day sets kept
            days = "AND day >= :first_day"
            params["first_day"] = self.first_day.isoformat()
        else:
            days = ""
        keys = ", ".join(self.value_key.format(f":v{i}") for i in range(len(values)))
        return dict(_rows(self.connection,
                          "SELECT value, count(DISTINCT user_id) FROM daily_value_users "
                          f"WHERE site_id = :site AND property = :property "
                          f"AND {self.value_key.format('value')} IN ({keys}) {days} GROUP BY value", params))

    def prop_names(self, site_id, period, limit):
        # A skip scan: one index seek from each prop's name to the next, whatever the number
        # of its values; the names sort together, after the prefix (byte order in both stores).
        if period.all_time:
            table, days, params = "total_values", "", {}
        else:
            table, days, params = "daily_values", "AND day BETWEEN :first_day AND :last_day", period.day_bounds()
        after = (f"(SELECT property FROM {table} WHERE site_id = :site AND property > {{}} "
                 "ORDER BY property LIMIT 1)")
        is_prop = f"substr(property, 1, {len(PROP_PREFIX)}) = '{PROP_PREFIX}'"
        return _rows(self.connection,
                     f"WITH RECURSIVE name (property) AS (SELECT {after.format(':props')} "
                     f"UNION ALL SELECT {after.format('name.property')} FROM name WHERE {is_prop}) "
                     f"SELECT property FROM name WHERE {is_prop} AND EXISTS (SELECT 1 FROM {table} "
                     f"WHERE site_id = :site AND property = name.property {days}) LIMIT :limit",
                     {"site": site_id, "props": PROP_PREFIX, "limit": limit, **params})

    def bucket_views(self, site_id, period, interval):
        width = 10 if interval == "day" else 13
        return _rows(self.connection,
                     f"SELECT substr(hour, 1, {width}), {VIEWS} FROM hourly_totals "
                     "WHERE site_id = :site AND hour BETWEEN :first_hour AND :last_hour GROUP BY 1",
                     {"site": site_id, **period.hour_bounds()})

    def bucket_users(self, site_id, period, interval):
        params = {"site": site_id, **period.day_bounds()}
        if interval == "day":
            return _rows(self.connection, f"SELECT day, {USERS} FROM daily_totals WHERE site_id = :site "
                         "AND day BETWEEN :first_day AND :last_day GROUP BY day", params)
        # An hour's users are the day's users whose mask has the hour's bit. Most
        # users share a handful of masks, so count users per mask and spread each
        # count over its hours here: cheaper than 24 bit sums over every row.
        masks = _rows(self.connection, "SELECT day, hours, count(*) FROM daily_users WHERE site_id = :site "
                      "AND day BETWEEN :first_day AND :last_day GROUP BY day, hours", params)
        users = {}
        for day, mask, count in masks:
            for hour in range(24):
                if mask >> hour & 1:
                    bucket = f"{day}T{hour:02d}"
                    users[bucket] = users.get(bucket, 0) + count
        return list(users.items())


class RawReports(_Reports):
    """The same reports by plain SQL over the events table."""

    def __init__(self, connection, json_value="json_extract(props, '$.\"{key}\"')",
                 json_pairs="json_each(props) AS prop", first_day=None):
        super().__init__(connection, first_day)
        self.json_value = json_value        # how this database reads one prop
        self.json_pairs = json_pairs        # and every prop of an event, as prop.key, prop.value

    def _where(self, site_id, period):
        if period.all_time:
            return f"site_id = :site AND {COUNTED}", {"site": site_id}
        return (f"site_id = :site AND {COUNTED} AND timestamp >= :first_ts AND timestamp <= :last_ts",
                {"site": site_id, **period.timestamp_bounds()})

    def totals(self, site_id, period):
        where, params = self._where(site_id, period)
        row = self.connection.execute(
            f"SELECT count(*) FILTER (WHERE event_type = 'page_view'), count(DISTINCT {USER}) FROM events WHERE {where}",
            params).fetchone()
        return (row[0] or 0, row[1] or 0)

    def site_rows(self):
        return _rows(self.connection, "SELECT site_id, count(*) FILTER (WHERE event_type = 'page_view'), "
                     f"count(DISTINCT {USER}) FROM events WHERE {COUNTED} GROUP BY site_id ORDER BY site_id", {})

    def top_values(self, site_id, prop, period, limit, views_only=False):
        where, params = self._where(site_id, period)
        return _rows(self.connection,
                     f"SELECT * FROM (SELECT {property_expression(prop, self.json_value)} AS value, "
                     f"count(*) FILTER (WHERE event_type = 'page_view') AS views, count(*) AS events FROM events "
                     f"WHERE {where} GROUP BY 1) AS v WHERE value IS NOT NULL {_ranking(views_only)}",
                     {**params, "limit": limit})

    def value_users(self, site_id, prop, period, values):
        where, params = self._where(site_id, period)
        rows = _rows(self.connection, f"SELECT {property_expression(prop, self.json_value)}, count(DISTINCT {USER}) "
                     f"FROM events WHERE {where} GROUP BY 1", params)
        return {value: users for value, users in rows if value in values}

    def prop_names(self, site_id, period, limit):
        where, params = self._where(site_id, period)
        return _rows(self.connection, f"SELECT DISTINCT :props || prop.key FROM events, {self.json_pairs} "
                     f"WHERE {where} ORDER BY 1 LIMIT :limit", {**params, "props": PROP_PREFIX, "limit": limit})

    def bucket_views(self, site_id, period, interval):
        where, params = self._where(site_id, period)
        width = 10 if interval == "day" else 13
        return _rows(self.connection, f"SELECT substr(timestamp, 1, {width}), "
                     f"count(*) FILTER (WHERE event_type = 'page_view') FROM events WHERE {where} GROUP BY 1", params)

    def bucket_users(self, site_id, period, interval):
        where, params = self._where(site_id, period)
        width = 10 if interval == "day" else 13
        return _rows(self.connection, f"SELECT substr(timestamp, 1, {width}), "
                     f"count(DISTINCT {USER}) FROM events WHERE {where} GROUP BY 1", params)
