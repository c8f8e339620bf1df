"""How fast reports answer as events pile up, against DuckDB and plain SQL over the same events.

    .venv/bin/python bench/reports_bench.py                  1M and 10M events, writes bench/REPORTS.md
    .venv/bin/python bench/reports_bench.py --sizes 200000 --out bench/out/REPORTS-quick.md

For each size the events come from bench/generate.py (as the API queues them),
then go into a SQLite store with the store's own verbs: the rows processor.py
would store, written with SQLiteStore.write (rollups off, the events table's
indexes dropped during the load and made again after it from their own
definitions), then SQLiteStore.rebuild_rollups, which computes the rollups
exactly as the processor keeps them (rollups.BatchTotals per 100,000 events).
Building the processor's way, batch by batch, takes ~20,000 events/s here,
too slow for 10M in one run. The built data waits in bench/out/reports-data
and is used again while generate.py, events.py, enrich.py, rollups.py and
store.py are unchanged (--fresh builds it again).

Then the same questions about the busiest site go to four answerers, in turns:

    api        GET /stats... through ingestion_api.create_app's Flask test client
               (the production path: routing, checks, the read-only connection the
               thread keeps, RollupReports over the rollups, JSON); no sockets
    rollups    RollupReports on one open connection (the api minus HTTP/JSON)
    raw        RawReports: plain SQL over the events table, with one covering index
               over every column the reports read (built by this benchmark)
    duckdb     the same SQL in DuckDB (2 threads, in memory) over the same events,
               loaded from the generated file

All answers must be equal, else the run fails (exit 1) after writing the report.
"""
import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import date, datetime, timedelta, timezone
from datetime import time as day_start
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import generate  # noqa: E402  (bench/generate.py, beside this file)
import reports  # noqa: E402
import rollups  # noqa: E402
from config import load_config  # noqa: E402
from enrich import enrich  # noqa: E402
from events import parse_line  # noqa: E402
from reports import Period, RawReports, RollupReports  # noqa: E402
from store import SQLiteStore  # noqa: E402

SIZES = [1_000_000, 10_000_000]
FAST = dict(reps=300, budget=2.0, min_reps=5)       # api and rollups, per question
SLOW = dict(reps=20, budget=2.0, min_reps=3)        # raw and duckdb, per question
LOAD_BYTES = 64 * 2 ** 20                           # queue lines read per store.write
BUILT_FROM = ("bench/generate.py", "events.py", "enrich.py", "rollups.py", "store.py")
COVERING_INDEX = ("CREATE INDEX IF NOT EXISTS bench_events_covering ON events "
                  "(site_id, timestamp, event_type, path, user_id, visitor_id)")
TARGET_STATS_MS = 5.0
TARGET_GROWTH = 2.0
TARGET_VS_DUCKDB = 10.0


# -- measuring -------------------------------------------------------------

def busy_cpu_seconds():
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq + getattr(times, "steal", 0)


def own_cpu_seconds():
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class Meter:
    """Wall time of a block and how many cores other processes kept busy meanwhile."""

    def __enter__(self):
        self.started, self.own, self.busy = time.perf_counter(), own_cpu_seconds(), busy_cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started
        others = busy_cpu_seconds() - self.busy - (own_cpu_seconds() - self.own)
        self.others = max(0.0, others) / max(self.seconds, 1e-9)

    def figures(self):
        return {"seconds": self.seconds, "others": self.others}


def percentile(samples, fraction):
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def repeat(calls, reps, budget, min_reps):
    """Call each of calls in turn: a first untimed round whose answers are kept, then up to
    reps timed rounds (at least min_reps, then until budget seconds per call are spent).
    Taking turns makes the answerers compared share whatever else the machine is doing."""
    answers = [call() for call in calls]
    samples = [[] for _ in calls]
    deadline = time.perf_counter() + budget * len(calls)
    for round_ in range(reps):
        for call, timings in zip(calls, samples):
            started = time.perf_counter()
            call()
            timings.append(time.perf_counter() - started)
        if round_ + 1 >= min_reps and time.perf_counter() > deadline:
            break
    return answers, samples


# -- building the data -----------------------------------------------------

def fingerprint(*paths):
    digest = hashlib.sha1()
    for path in paths:
        digest.update((REPO / path).read_bytes())
    return digest.hexdigest()[:8]


def generated(size, seed, data_root, log):
    """The queue file of size events, generated once per generate.py version."""
    queue_file = data_root / f"events-{size}-seed{seed}-{fingerprint('bench/generate.py')}.jsonl"
    if not queue_file.exists():
        partial = queue_file.with_suffix(".part")
        with Meter() as meter:
            summary = generate.generate(partial, size, seed)
        generate.check(partial, limit=2000)
        partial.rename(queue_file)
        log(f"  generated {size:,} events in {meter.seconds:.0f}s, {summary['page_views'] / size:.1%} "
            f"page views; sampled lines verified")
    return queue_file


def load_events(sqlite_store, queue_file, size, log):
    """Store the rows processor.py stores for these lines (parse_line, enrich), rollups off.

    The events table's indexes are dropped for the load and made again after it
    from their own definitions: one sort instead of a B-tree update per row.
    """
    sqlite_store.migrate()
    connection = sqlite_store.connection
    indexes = connection.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                                 "AND tbl_name = 'events' AND sql IS NOT NULL").fetchall()
    for name, _ in indexes:
        connection.execute(f"DROP INDEX {name}")
    stored, started = 0, time.perf_counter()
    with open(queue_file, "rb") as lines:
        while batch := lines.readlines(LOAD_BYTES):
            rows = []
            for line in batch:
                row, data = parse_line(line)
                rows.append(row + (data.get("id"),) + enrich(data))
            sqlite_store.write(rows, "bench", None)
            stored += len(rows)
            log(f"  stored {stored:,} / {size:,} events "
                f"({stored / (time.perf_counter() - started):,.0f}/s)", progress=True)
    for _, sql in indexes:
        connection.execute(sql)


def build(size, seed, data_root, fresh, log):
    """The SQLite database of size events with its rollups; reused while its sources are unchanged."""
    queue_file = generated(size, seed, data_root, log)
    built = data_root / f"db-{size}-seed{seed}-{fingerprint(*BUILT_FROM)}"
    facts_file = built / "build.json"
    reused = facts_file.exists() and not fresh
    if not reused:
        shutil.rmtree(built, ignore_errors=True)
        built.mkdir(parents=True)
        database = built / "analytics.db"
        facts = {}
        with Meter() as meter:
            load_events(SQLiteStore(str(database), rollups=False), queue_file, size, log)
        facts["load"] = meter.figures()
        log(f"  events stored and indexed in {meter.seconds:.0f}s")
        sqlite_store = SQLiteStore(str(database))
        started = time.perf_counter()

        def progress(done, total):
            log(f"  rollups rebuilt over {done:,} / {total:,} events "
                f"({done / (time.perf_counter() - started):,.0f}/s)", progress=True)
        with Meter() as meter:
            sqlite_store.rebuild_rollups(progress)
        facts["rollups"] = meter.figures()
        log(f"  rollups rebuilt in {meter.seconds:.0f}s")
        with Meter() as meter:
            sqlite_store.connection.execute(COVERING_INDEX)
        facts["covering_index"] = meter.figures()
        facts.update(dataset_facts(sqlite_store.connection))
        sqlite_store.close()
        facts_file.write_text(json.dumps(facts))
        for old in data_root.glob(f"db-{size}-seed{seed}-*"):
            if old != built:
                shutil.rmtree(old)
        log(f"  built {built.name} (covering index {facts['covering_index']['seconds']:.0f}s)")
    facts = json.loads(facts_file.read_text())
    facts["reused"] = reused
    facts["db_bytes"] = os.path.getsize(built / "analytics.db")
    return queue_file, built, facts


def dataset_facts(connection):
    """Counted from the raw events: the busiest site, its busiest day of the middle third."""
    events = connection.execute("SELECT count(*) FROM events").fetchone()[0]
    site, site_events = connection.execute("SELECT site_id, count(*) FROM events GROUP BY 1 "
                                           "ORDER BY 2 DESC LIMIT 1").fetchone()
    per_day = dict(connection.execute("SELECT substr(timestamp, 1, 10), count(*) FROM events "
                                      "WHERE site_id = ? GROUP BY 1", (site,)).fetchall())
    days = sorted(per_day)
    middle = days[len(days) // 3: 2 * len(days) // 3]
    day = max(middle, key=lambda d: (per_day[d], d))
    rows = {table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in rollups.TABLES}
    return {"events": events, "site": site, "site_events": site_events, "day": day,
            "day_events": per_day[day], "first_day": days[0], "last_day": days[-1], "rows": rows}


# -- the questions ---------------------------------------------------------

class Question:
    def __init__(self, label, url, ask, part):
        self.label, self.url, self.ask, self.part = label, url, ask, part


def questions(site, day, first, last):
    """The benchmark's questions about the busiest site: all time (all its days) and one busy day."""
    day, first, last = (date.fromisoformat(text) for text in (day, first, last))
    everything, one_day, days = Period(), Period(day, day), Period(first, last)
    base = f"site_id={site}"
    stats = lambda body: {key: body[key] for key in ("total_views", "unique_users", "top_paths")}  # noqa: E731
    return [
        Question("/stats all-time", f"/stats?{base}", lambda r: r.stats(site, everything), stats),
        Question("/stats one day", f"/stats?{base}&date={day}", lambda r: r.stats(site, one_day), stats),
        Question("timeseries all days by day", f"/stats/timeseries?{base}&from={first}&to={last}&interval=day",
                 lambda r: r.timeseries(site, days, "day"), lambda body: body["points"]),
        Question("timeseries one day by hour", f"/stats/timeseries?{base}&date={day}&interval=hour",
                 lambda r: r.timeseries(site, one_day, "hour"), lambda body: body["points"]),
        Question("breakdown path all-time", f"/stats/breakdown?{base}&property=path",
                 lambda r: r.breakdown(site, "path", everything), lambda body: body["results"]),
        Question("breakdown path one day", f"/stats/breakdown?{base}&property=path&date={day}",
                 lambda r: r.breakdown(site, "path", one_day), lambda body: body["results"]),
        Question("breakdown event_type all-time", f"/stats/breakdown?{base}&property=event_type",
                 lambda r: r.breakdown(site, "event_type", everything), lambda body: body["results"]),
        Question("breakdown event_type one day", f"/stats/breakdown?{base}&property=event_type&date={day}",
                 lambda r: r.breakdown(site, "event_type", one_day), lambda body: body["results"]),
    ]


def spot_checks(first_day):
    """More questions, only checked for equal answers: small sites, other periods."""
    first = date.fromisoformat(first_day)
    week = Period(first + timedelta(days=60), first + timedelta(days=66))
    checks = []
    for site in ("site10", "site50", "no-such-site"):
        checks += [(site, "stats week", lambda r, s=site: r.stats(s, week, limit=50)),
                   (site, "stats first day", lambda r, s=site: r.stats(s, Period(first, first))),
                   (site, "timeseries week by day", lambda r, s=site: r.timeseries(s, week, "day")),
                   (site, "breakdown path week", lambda r, s=site: r.breakdown(s, "path", week, 25)),
                   (site, "breakdown event_type all-time",
                    lambda r, s=site: r.breakdown(s, "event_type", Period()))]
    return checks


class DuckDBReports(reports._Reports):
    """RawReports' questions in DuckDB SQL, over a table whose timestamp column is a TIMESTAMP.

    Breakdown users are counted only for the values asked about, as a DuckDB
    user would write it.
    """

    def _where(self, site_id, period):
        where, params = f"site_id = $site AND {rollups.COUNTED}", {"site": site_id}
        if not period.all_time:
            where += " AND ts >= $first AND ts < $after"
            params.update(first=datetime.combine(period.start, day_start()),
                          after=datetime.combine(period.end + timedelta(days=1), day_start()))
        return where, params

    def _rows(self, sql, params):
        return self.connection.execute(sql, params).fetchall()

    def totals(self, site_id, period):
        where, params = self._where(site_id, period)
        views, users = self._rows(f"SELECT count(*) FILTER (WHERE event_type = 'page_view'), "
                                  f"count(DISTINCT {rollups.USER}) FROM events WHERE {where}", params)[0]
        return views, users

    def top_values(self, site_id, prop, period, limit, views_only=False):
        where, params = self._where(site_id, period)
        ranking = ("AND views > 0 AND value != '' ORDER BY views DESC, value" if views_only
                   else "ORDER BY views DESC, events DESC, value")
        return self._rows(
            f"SELECT * FROM (SELECT {rollups.property_expression(prop)} AS value, "
            f"count(*) FILTER (WHERE event_type = 'page_view') AS views, count(*) AS events "
            f"FROM events WHERE {where} GROUP BY 1) WHERE value IS NOT NULL {ranking} LIMIT $limit",
            {**params, "limit": limit})

    def value_users(self, site_id, prop, period, values):
        if not values:
            return {}
        where, params = self._where(site_id, period)
        expression = rollups.property_expression(prop)
        params.update({f"v{i}": value for i, value in enumerate(values)})
        wanted = ", ".join(f"$v{i}" for i in range(len(values)))
        return dict(self._rows(f"SELECT {expression}, count(DISTINCT {rollups.USER}) FROM events "
                               f"WHERE {where} AND {expression} IN ({wanted}) GROUP BY 1", params))

    def _buckets(self, site_id, period, interval, measure):
        where, params = self._where(site_id, period)
        shape = "%Y-%m-%d" if interval == "day" else "%Y-%m-%dT%H"
        return self._rows(f"SELECT strftime(bucket, '{shape}'), n FROM (SELECT date_trunc('{interval}', ts) "
                          f"AS bucket, {measure} AS n FROM events WHERE {where} GROUP BY 1)", params)

    def bucket_views(self, site_id, period, interval):
        return self._buckets(site_id, period, interval, "count(*) FILTER (WHERE event_type = 'page_view')")

    def bucket_users(self, site_id, period, interval):
        return self._buckets(site_id, period, interval, f"count(DISTINCT {rollups.USER})")


def load_duckdb(queue_file):
    """An in-memory DuckDB (2 threads) holding the queued events, in their order; visitor_id
    is NULL, as the processor stores it for events sent to the JSON API."""
    import duckdb
    connection = duckdb.connect(config={"threads": 2})
    connection.execute(
        "CREATE TABLE events AS SELECT site_id, event_type, path, user_id, "
        "CAST(NULL AS VARCHAR) AS visitor_id, CAST(timestamp AS TIMESTAMP) AS ts "
        "FROM read_json($path, format = 'newline_delimited', columns = {site_id: 'VARCHAR', "
        "event_type: 'VARCHAR', path: 'VARCHAR', user_id: 'VARCHAR', timestamp: 'VARCHAR'})",
        {"path": str(queue_file)})
    return connection


# -- one size --------------------------------------------------------------

def measure_size(size, seed, data_root, fresh, log):
    log(f"{size:,} events")
    queue_file, built, facts = build(size, seed, data_root, fresh, log)
    if facts["events"] != size:
        raise SystemExit(f"the store holds {facts['events']:,} events, not {size:,}")
    asked = questions(facts["site"], facts["day"], facts["first_day"], facts["last_day"])
    timings = {question.label: {} for question in asked}
    answers = {question.label: {} for question in asked}
    phases = {}

    def run(answerers, settings):
        """answerers: {name: (make_call(question), the answer of a call's result)}."""
        names = list(answerers)
        with Meter() as meter:
            for question in asked:
                calls = [answerers[name][0](question) for name in names]
                answered, samples = repeat(calls, **settings)
                for name, answer, samples_ in zip(names, answered, samples):
                    answers[question.label][name] = answerers[name][1](answer, question)
                    timings[question.label][name] = samples_
        phases[" + ".join(names)] = meter.figures()
        log(f"  {' + '.join(names):<16} timed in {meter.seconds:5.1f}s (others used {meter.others:.2f} cores)")

    def asking(reports_):
        return (lambda question: lambda: question.ask(reports_)), (lambda answer, question: answer)

    from ingestion_api import create_app
    client = create_app(load_config(environ={}, data_dir=str(built))).test_client()

    def api_call(question):
        def call():
            response = client.get(question.url)
            if response.status_code != 200:
                raise SystemExit(f"{question.url} answered {response.status_code}: {response.data!r}")
            return response
        return call

    reader = sqlite3.connect(f"file:{built / 'analytics.db'}?mode=ro", uri=True)
    run({"api": (api_call, lambda response, question: question.part(response.get_json())),
         "rollups": asking(RollupReports(reader))}, FAST)
    with Meter() as meter:
        duck = load_duckdb(queue_file)
    duckdb_load = meter.figures()
    log(f"  DuckDB loaded the queue file in {meter.seconds:.0f}s")
    raw_reports, duck_reports = RawReports(reader), DuckDBReports(duck)
    run({"raw": asking(raw_reports), "duckdb": asking(duck_reports)}, SLOW)

    differences = [f"{label}: {name}" for label, by_name in answers.items()
                   for name, answer in by_name.items() if answer != by_name["raw"]]
    rollup_reports, checked = RollupReports(reader), len(asked) * 3
    for spot_site, label, ask in spot_checks(facts["first_day"]):
        expected = ask(raw_reports)
        for name, answerer in (("rollups", rollup_reports), ("duckdb", duck_reports)):
            checked += 1
            if ask(answerer) != expected:
                differences.append(f"{spot_site} {label}: {name}")
    plan = "; ".join(row[3] for row in reader.execute(
        f"EXPLAIN QUERY PLAN SELECT count(DISTINCT {rollups.USER}) FROM events "
        f"WHERE site_id = 'x' AND {rollups.COUNTED}"))
    day_user_rows = reader.execute("SELECT count(*) FROM daily_users WHERE site_id = ? AND day = ?",
                                   (facts["site"], facts["day"])).fetchone()[0]
    reader.close()
    duck.close()
    log(f"  {checked} answers compared with raw SQL's, {len(differences)} differ"
        + (f": {differences}" if differences else ""))
    return {"size": size, "build": facts, "duckdb_load": duckdb_load, "phases": phases,
            "timings": timings, "checked": checked, "differences": differences, "raw_plan": plan,
            "day_user_rows": day_user_rows}


# -- the report ------------------------------------------------------------

def ms(seconds):
    return f"{seconds * 1000:.2f}" if seconds < 0.1 else f"{seconds * 1000:,.0f}"


def ratio(slow, fast):
    value = slow / fast
    return f"{value:,.0f}x" if value >= 10 else f"{value:.1f}x"


def p50(figures, label, name="api"):
    return statistics.median(figures["timings"][label][name])


def size_table(figures):
    lines = ["| question | api p50 | api p99 | rollups p50 | raw SQL p50 | raw SQL p99 | DuckDB p50 "
             "| DuckDB p99 | raw SQL / api | DuckDB / api |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, by_name in figures["timings"].items():
        median = {name: statistics.median(samples) for name, samples in by_name.items()}
        api = median["api"]
        lines.append(
            f"| {label} | {ms(api)} | {ms(percentile(by_name['api'], 0.99))} | {ms(median['rollups'])} "
            f"| {ms(median['raw'])} | {ms(percentile(by_name['raw'], 0.99))} | {ms(median['duckdb'])} "
            f"| {ms(percentile(by_name['duckdb'], 0.99))} | {ratio(median['raw'], api)} "
            f"| {ratio(median['duckdb'], api)} |")
    return lines


def targets(sizes):
    largest, lines = sizes[-1], []
    for label in ("/stats all-time", "/stats one day"):
        value = p50(largest, label) * 1000
        lines.append(f"| {label} p50 at {largest['size']:,} events <= {TARGET_STATS_MS:.0f} ms "
                     f"| {value:.2f} ms | {'met' if value <= TARGET_STATS_MS else '**missed**'} |")
    if len(sizes) > 1:
        for label in ("/stats all-time", "/stats one day"):
            growth = p50(largest, label) / p50(sizes[0], label)
            lines.append(f"| {label} p50 at {largest['size']:,} / at {sizes[0]['size']:,} "
                         f"<= {TARGET_GROWTH:.0f} | {growth:.2f} "
                         f"| {'met' if growth <= TARGET_GROWTH else '**missed**'} |")
    for figures in sizes:
        for label in ("/stats all-time", "/stats one day"):
            speedup = p50(figures, label, "duckdb") / p50(figures, label)
            lines.append(f"| {label} at {figures['size']:,}: DuckDB p50 / api p50 >= {TARGET_VS_DUCKDB:.0f} "
                         f"| {speedup:,.1f} | {'met' if speedup >= TARGET_VS_DUCKDB else '**missed**'} |")
    for figures in sizes:
        verdict = "all equal" if not figures["differences"] else f"**{len(figures['differences'])} differ**"
        lines.append(f"| answers at {figures['size']:,}: api = rollups = raw SQL = DuckDB "
                     f"| {figures['checked']} compared | {verdict} |")
    return lines


def size_section(figures):
    facts, size = figures["build"], figures["size"]
    rows = ", ".join(f"{table} {count:,}" for table, count in facts["rows"].items())
    samples = [len(samples) for by_name in figures["timings"].values() for samples in by_name.values()]
    return [f"## {size:,} events", "",
            f"Busiest site `{facts['site']}`: {facts['site_events']:,} events; one day = {facts['day']} "
            f"({facts['day_events']:,} events of the site); all days = {facts['first_day']}..{facts['last_day']}. "
            "Times in ms; ratios are p50 / api p50.", ""] + size_table(figures) + [
            "",
            f"- Samples per (question, answerer): {min(samples)}-{max(samples)}; the p99 of fewer than "
            "100 samples is their maximum. Others' load while timing, in cores: "
            + ", ".join(f"{name} {meter['others']:.2f}" for name, meter in figures["phases"].items()) + ".",
            f"- Build{' (reused from an earlier run)' if facts['reused'] else ''}: events stored "
            f"{facts['load']['seconds']:.0f}s ({size / facts['load']['seconds']:,.0f}/s), rollups rebuilt "
            f"{facts['rollups']['seconds']:.0f}s ({size / facts['rollups']['seconds']:,.0f} events/s), "
            f"covering index {facts['covering_index']['seconds']:.0f}s; database "
            f"{facts['db_bytes'] / 2 ** 20:,.0f} MiB ({facts['db_bytes'] / size:.0f} bytes/event).",
            f"- Rollup rows: {rows}.",
            f"- DuckDB loaded the queue file in {figures['duckdb_load']['seconds']:.0f}s (not in its times).",
            f"- Raw SQL plan (all-time users): `{figures['raw_plan']}`.",
            f"- The day has {figures['day_user_rows']:,} rows of daily_users (one per user, with the "
            "hours seen); its unique users are one row of daily_totals.", ""]


def write_report(path, saved):
    sizes = saved["sizes"]
    lines = ["# Report latency: rollups against DuckDB and plain SQL", "",
             f"Measured {saved['started'][:16].replace('T', ' ')} UTC on {saved['machine']}; "
             f"source {saved['source']}.",
             f"Command: `{saved['command']}` ({saved['seconds'] / 60:.1f} minutes in all, builds included).",
             "", "## Targets", "", "| target | measured | verdict |", "|---|---:|---|"] + targets(sizes) + [""]
    for figures in sizes:
        lines += size_section(figures)
    if len(sizes) > 1:
        lines += ["## Growth", "", "| question | " + " | ".join(f"api p50 at {f['size']:,}" for f in sizes)
                  + " | last / first |", "|---|" + "---:|" * (len(sizes) + 1)]
        for label in sizes[0]["timings"]:
            values = [p50(f, label) for f in sizes]
            lines.append(f"| {label} | " + " | ".join(ms(v) for v in values) + f" | {values[-1] / values[0]:.1f}x |")
        lines.append("")
    lines += ["## What limits each figure", "",
              "- api: one request at a time through the Flask test client in this process: routing, "
              "parameter checks, the read-only SQLite connection the thread keeps between requests "
              "(a stat of the database file checks it was not replaced), the rollup queries, JSON. "
              "No sockets and no gunicorn (bench/RESULTS.md measures those).",
              "- rollups: the same queries on one open connection; api minus rollups is Flask's "
              "routing, the parameter checks and the JSON.",
              "- /stats one day: views, top paths and users are read from rows kept at write time "
              "(hourly_totals, daily_values, daily_totals.users), so it stays flat as events pile up. "
              "Unique users over several days, per hour, or per value are counted at read time from "
              "the user sets (daily_users, daily_value_users), so their cost grows with the users of "
              "the period, not with the size of the answer.",
              "- all-time timeseries and breakdowns: per-day users are counters (daily_totals), but "
              "breakdown users are counted over every day's set (daily_value_users per value), so "
              "they grow with the data; views and events alone would not.",
              "- raw SQL: RawReports with a covering index, so no query touches the table; it still reads "
              "every event of the site (all time) or of the day, and counts distinct users by sorting them.",
              "- DuckDB: in memory, 2 threads, columnar scans of the whole site; the same questions in "
              "its SQL (breakdown users counted only for the values shown).",
              "- The machine is small and shared: others' load is noted per phase; p99 suffers first.", ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))


def machine():
    import duckdb
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} cores ({model}), {psutil.virtual_memory().total / 2 ** 30:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}; Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, DuckDB {duckdb.__version__}")


def source_version():
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    try:
        # the other benchmarks' results, written earlier in the same `make bench`, are no change of code
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/*.md")
        return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help="comma-separated event counts (default 1000000,10000000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="build the data again even if it is there")
    parser.add_argument("--data", default=str(REPO / "bench" / "out" / "reports-data"),
                        help="where generated and built data is kept between runs")
    parser.add_argument("--out", default=str(REPO / "bench" / "REPORTS.md"), help="the report file")
    parser.add_argument("--report-from", metavar="JSON", help="write the report from saved figures only")
    args = parser.parse_args(argv)
    if args.report_from:
        saved = json.loads(Path(args.report_from).read_text())
        write_report(args.out, saved)
        return 0
    sizes = sorted(int(size) for size in args.sizes.split(",")) if args.sizes else SIZES
    data_root = Path(args.data)
    data_root.mkdir(parents=True, exist_ok=True)
    started, began = datetime.now(timezone.utc), time.perf_counter()

    def log(message, progress=False):
        line = f"[{time.perf_counter() - began:5.0f}s] {message}"
        print(f"\r{line}" if progress else f"\r{line}\n", end="", flush=True)

    measured = [measure_size(size, args.seed, data_root, args.fresh, log) for size in sizes]
    saved = {"command": "python bench/reports_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "started": started.isoformat(), "seconds": time.perf_counter() - began, "sizes": measured,
             "machine": machine(), "source": source_version()}
    figures_file = REPO / "bench" / "out" / "reports.json"
    figures_file.write_text(json.dumps(saved))
    write_report(args.out, saved)
    for figures in measured:
        print(f"\n{figures['size']:,} events (ms)\n" + "\n".join(size_table(figures)))
    print("\nTargets\n" + "\n".join(targets(measured)) + f"\n\nwrote {args.out} (figures in {figures_file})")
    if any(figures["differences"] for figures in measured):
        print("ANSWERS DIFFER: see the report", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
