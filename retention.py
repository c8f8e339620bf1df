"""Retention: the processor deletes events and rollup rows older than the settings allow.

RETENTION_DAYS=N keeps the events of today and the N UTC days before it;
ROLLUP_RETENTION_DAYS does the same, independently, for the per-hour and
per-day rollups. 0 keeps everything. Visitor salts older than yesterday go
each day whatever the settings: the API deletes them only when a request
comes, and a day without one must not keep them. All-time totals (site_totals,
total_values, site_users) are never deleted, so an all-time figure still
counts every event ever stored.

A pass walks each dated table by its key, one window of RETENTION_BATCH_SIZE
rows per transaction and at most one window every RETENTION_INTERVAL
seconds, between the processor's own batches: neither ingestion (which
writes only the queue) nor the processor ever waits on more than one small
transaction. A pass runs at start and again when the date moves the cutoff;
processor --once finishes the one it started before it exits.
"""
import logging
import time
from datetime import datetime, timedelta, timezone

from store import StoreUnavailable

log = logging.getLogger("retention")

ROLLUP_TABLES = ("hourly_totals", "daily_users", "daily_totals", "daily_values", "daily_value_users")
MAX_BACKOFF = 300.0
PROGRESS_EVERY = 5.0


def utc_today():
    return datetime.now(timezone.utc).date()


def first_day_kept(today, days):
    return (today - timedelta(days=days)).isoformat()


def _failed(error, message, *args):
    """An outage (the database down, busy or full) is one line; anything else, with its traceback."""
    if isinstance(error, StoreUnavailable):
        log.warning(message + ": %s", *args, error)
    else:
        log.exception(message, *args)


class Retention:
    def __init__(self, store, config, today=utc_today, clock=time.monotonic, on_failure=lambda: None):
        self.store = store
        self.config = config
        self.on_failure = on_failure        # after each failed window (metrics)
        self.today = today          # both given by tests, to run a pass without waiting
        self.clock = clock
        self.next_time = 0.0
        self.backoff = config.retention_interval
        self.finished = []          # the plan of the last finished pass
        self.remaining = []         # [(table, first day kept)] of the pass in progress
        self.after = None           # where the current table's next window starts
        self.deleted = 0            # rows deleted from the current table in this pass
        self.salts_day = None       # the day old salts were last deleted on

    def plan(self):
        """[(table, first day kept)] for every table whose rows expire now."""
        tables = []
        if self.config.retention_days:
            tables.append(("events", first_day_kept(self.today(), self.config.retention_days)))
        if self.config.rollup_retention_days:
            day = first_day_kept(self.today(), self.config.rollup_retention_days)
            tables += [(table, day) for table in ROLLUP_TABLES]
        return tables

    @property
    def in_pass(self):
        return bool(self.remaining)

    def step(self):
        """Delete one window if one is due; returns the rows it deleted."""
        now = self.clock()
        if now < self.next_time:
            return 0
        self.next_time = now + self.config.retention_interval
        today = self.today()
        if today != self.salts_day:
            try:
                self.store.forget_salts(first_day_kept(today, 1))
            except Exception as error:
                _failed(error, "deleting old visitor salts failed; retrying in %.1fs", self.backoff)
                return self._retry_later(now)
            self.salts_day = today
        if not self.remaining:
            plan = self.plan()
            if plan == self.finished:
                return 0
            log.info("retention pass started tables=%d first_day_kept=%s",
                     len(plan), ",".join(f"{table}:{day}" for table, day in plan))
            self.remaining, self.finished = list(plan), []
        table, day = self.remaining[0]
        try:
            deleted, self.after = self.store.delete_before(
                table, day, self.after, self.config.retention_batch_size)
        except Exception as error:
            _failed(error, "retention batch failed table=%s; retrying in %.1fs", table, self.backoff)
            return self._retry_later(now)
        self.backoff = self.config.retention_interval
        self.deleted += deleted
        if deleted:
            log.info("retention deleted table=%s rows=%d before=%s", table, deleted, day)
        if self.after is None:
            self._table_done(table, day)
        return deleted

    def _retry_later(self, now):
        self.on_failure()
        self.next_time = now + self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)
        return 0

    def finish_pass(self, stopping):
        """Run the pass in progress to its end, still one window per interval, unless stopping is set.

        For processor --once, which would otherwise exit after one window.
        Windows that delete nothing log nothing, so where the walk is gets
        logged every few seconds.
        """
        reported = self.clock()
        while self.in_pass and not stopping.is_set():
            stopping.wait(max(0.0, self.next_time - self.clock()))
            self.step()
            if self.in_pass and self.clock() - reported >= PROGRESS_EVERY:
                log.info("retention progress table=%s deleted=%d tables_left=%d", self.remaining[0][0],
                         self.deleted, len(self.remaining))
                reported = self.clock()

    def _table_done(self, table, day):
        log.info("retention finished table=%s deleted=%d before=%s", table, self.deleted, day)
        self.finished.append(self.remaining.pop(0))
        self.deleted = 0
