"""Processor throughput: queued events drained into SQLite, each figure against a baseline.

    flock /tmp/bench.lock .venv/bin/python bench/processor_bench.py [--events N] [--rounds R]

Writes bench/PROCESSOR.md. In one run, rounds interleaved so that other load on
the machine hits every variant alike:

- processor.py --once draining N queued POST /event events (rollups and
  enrichment on, as deployed) against a plain executemany of the same rows
  into the same table, with the same pragmas, 10,000 rows per transaction;
- the same drain with rollups off (the ratio is what rollups cost);
- a drain of browser events (as POST /api/event queues them: User-Agent,
  referrer, UTM tags, props) with enrichment on and off, rollups on and off.
"""
import argparse
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import OUT, PYTHON, REPO, BenchError, peak_rss_mb  # noqa: E402
from events import encode_event, format_timestamp, new_event_id, validate_event  # noqa: E402

RESULTS = REPO / "bench" / "PROCESSOR.md"
TARGETS = {"drain": 150_000, "plain": 0.5, "rollups": 0.7, "enrichment": 0.5, "rss": 150}
BROWSERS = [("Chrome", "Chrome/{v}.0.0.0 Safari/537.36"), ("Firefox", "Firefox/{v}.0"),
            ("Edge", "Chrome/{v}.0.0.0 Safari/537.36 Edg/{v}.0.0.0")]
SYSTEMS = ["Windows NT 10.0; Win64; x64", "Macintosh; Intel Mac OS X 10_15_7", "X11; Linux x86_64",
           "Linux; Android 14; Pixel 8", "Linux; Android 13; SM-S918B"]
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS {v}_0 like Mac OS X) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Version/{v}.0 Mobile/15E148 Safari/604.1")


def log(message):
    print(message, flush=True)


# -- data ------------------------------------------------------------------------

def api_lines(count, seed=20250131):
    """Queue lines exactly as POST /event writes them: 20 sites, 500 paths, 100,000 users, 7 days."""
    rng = random.Random(seed)
    sites = [f"site-{number:02d}.example" for number in range(20)]
    site_of = rng.choices(sites, weights=[1 / (rank + 1) for rank in range(20)], k=count)
    paths = [f"/docs/section-{number // 25}/page-{number}" for number in range(500)]
    kinds = ["page_view"] * 8 + ["click", "signup"]
    start, received = datetime(2025, 1, 1, tzinfo=timezone.utc), datetime(2025, 2, 1, tzinfo=timezone.utc)
    step = timedelta(days=7) / count
    for number in range(count):
        event = {"site_id": site_of[number], "event_type": rng.choice(kinds),
                 "path": rng.choice(paths), "timestamp": (start + number * step).isoformat()}
        if rng.random() < 0.9:
            event["user_id"] = f"u-{rng.randrange(100_000):06d}"
        yield encode_event(validate_event(event, now=received))


def user_agents(rng):
    agents = [f"Mozilla/5.0 ({system}) AppleWebKit/537.36 (KHTML, like Gecko) {tail.format(v=version)}"
              for system in SYSTEMS for _, tail in BROWSERS for version in range(110, 140)]
    agents += [IPHONE.format(v=version) for version in range(12, 19)]
    rng.shuffle(agents)
    return agents


def browser_lines(count, seed=20250201):
    """Queue lines as POST /api/event writes them: cookieless visitors, ~470 User-Agents (Zipf),
    referrers (some internal), UTM tags on one in ten, props on one in twenty, engagement events."""
    rng = random.Random(seed)
    agents = user_agents(rng)
    agent_weights = [1 / (rank + 1) for rank in range(len(agents))]
    sites = [f"shop-{number:02d}.example" for number in range(20)]
    referrers = [None] * 5 + ["https://www.google.com/", "https://news.ycombinator.com/item?id=1",
                              "https://duckduckgo.com/", "https://t.co/abc"]
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    step = timedelta(days=7) / count
    for number in range(count):
        site = sites[min(int(rng.paretovariate(1.2)) - 1, 19)]
        kind = rng.choice(["page_view"] * 7 + ["engagement", "engagement", "Signup"])
        referrer = rng.choice(referrers + [f"https://{site}/previous"])
        event = {"id": new_event_id(), "site_id": site, "event_type": kind,
                 "path": f"/products/{rng.randrange(300)}", "user_id": None,
                 "timestamp": format_timestamp(start + number * step),
                 "visitor_id": f"{rng.randrange(200_000):016x}",
                 "ua": rng.choices(agents, agent_weights)[0], "referrer": referrer,
                 "query": "utm_source=newsletter&utm_medium=email&utm_campaign=spring"
                          if rng.random() < 0.1 else None,
                 "props": {"plan": rng.choice(["free", "pro"])} if kind == "Signup" or rng.random() < 0.05
                          else None}
        if kind == "engagement":
            event.update(scroll_depth=rng.randrange(101), engaged_ms=rng.randrange(60_000))
        yield encode_event(event)


def write_queue(path, lines):
    with open(path, "wb") as file:
        for line in lines:
            file.write(line)
    return path.stat().st_size


# -- one drain, in a child process -------------------------------------------------

def drain_in_child(data_dir, rollups, enrichment):
    """Build the processor as processor.py does, with the switches, and drain the queue."""
    from config import load_config
    from processor import Processor
    from shared_queue import open_queue
    from store import SQLiteStore
    config = load_config(environ={}, data_dir=data_dir)
    store = SQLiteStore(config.database_path, rollups=rollups)
    processor = Processor(open_queue(config), store, config, enrichment=enrichment)
    processor.start()
    processor.run(once=True)


def drain(queue_file, work, name, rollups=True, enrichment=True, deployed=False):
    """Copy the queue into a fresh DATA_DIR and drain it; (events/s, seconds, peak RSS MB, rows)."""
    data = work / name
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    shutil.copy(queue_file, data / "event_queue.jsonl")
    OUT.mkdir(exist_ok=True)
    if deployed:
        command = [PYTHON, "processor.py", "--once"]
    else:
        command = [PYTHON, __file__, "--drain", str(data), "--rollups", str(rollups),
                   "--enrichment", str(enrichment)]
    started = time.perf_counter()
    with open(OUT / f"processor-{name}.log", "wb") as output:
        child = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, DATA_DIR=str(data)),
                                 stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        code, peak = wait_with_peak(child, timeout=900)
    seconds = time.perf_counter() - started
    if code != 0:
        raise BenchError(f"drain {name} exited {code}; see {OUT / f'processor-{name}.log'}")
    rows = count_rows(data / "analytics.db")
    return dict(rate=rows / seconds, seconds=seconds, peak_mb=peak, rows=rows, data=data)


def wait_with_peak(child, timeout):
    """(exit code, peak RSS in MB): the kernel's high-water mark, read every 0.1 s.

    Rarely, so that watching takes no CPU from the drain; the mark only grows,
    and a drain's memory grows steadily, so a late read loses little.
    """
    deadline, peak = time.monotonic() + timeout, 0.0
    while child.poll() is None:
        if time.monotonic() > deadline:
            child.kill()
            child.wait()
            raise BenchError(f"{child.args} did not finish within {timeout}s")
        peak = max(peak, peak_rss_mb(child.pid) or 0.0)
        time.sleep(0.1)
    return child.returncode, peak


def fold_later(drained, work):
    """The other shape: rollups folded after the drain, by `processor.py rebuild-rollups`.

    That folds the stored events 100,000 at a time, as a fold by watermark
    would; events/s counts the drain without rollups and the fold together.
    """
    started = time.perf_counter()
    with open(OUT / "processor-fold-later.log", "wb") as output:
        child = subprocess.Popen([PYTHON, "processor.py", "rebuild-rollups"], cwd=REPO,
                                 env=dict(os.environ, DATA_DIR=str(drained["data"])),
                                 stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        code, peak = wait_with_peak(child, timeout=900)
    if code != 0:
        raise BenchError(f"rebuild-rollups exited {code}; see {OUT / 'processor-fold-later.log'}")
    seconds = drained["seconds"] + time.perf_counter() - started
    return dict(rate=drained["rows"] / seconds, seconds=seconds, peak_mb=peak)


def count_rows(database):
    connection = sqlite3.connect(database)
    try:
        return connection.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        connection.close()


# -- the baseline ------------------------------------------------------------------

def plain_insert(stored_database, database, per_transaction=10_000):
    """The rows the processor stored, inserted again by a plain executemany: rows/s.

    Same schema (migrated by the store), same pragmas, the columns the rows
    have values in, 10,000 rows per transaction, no rollups, no deduplication.
    """
    from store import SQLiteStore
    source = sqlite3.connect(stored_database)
    names = [row[1] for row in source.execute("PRAGMA table_info(events)") if row[1] != "id"]
    used = [name for name in names
            if source.execute(f"SELECT 1 FROM events WHERE {name} IS NOT NULL LIMIT 1").fetchone()]
    rows = source.execute(f"SELECT {', '.join(used)} FROM events ORDER BY id").fetchall()
    source.close()
    store = SQLiteStore(str(database))
    store.migrate()
    store.close()
    insert = f"INSERT INTO events ({', '.join(used)}) VALUES ({', '.join('?' * len(used))})"
    connection = sqlite3.connect(database, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        started = time.perf_counter()
        for offset in range(0, len(rows), per_transaction):
            connection.execute("BEGIN")
            connection.executemany(insert, rows[offset:offset + per_transaction])
            connection.execute("COMMIT")
        return len(rows) / (time.perf_counter() - started)
    finally:
        connection.close()


# -- the run ---------------------------------------------------------------------

def measure(args, work):
    api_queue, browser_queue = work / "api.jsonl", work / "browser.jsonl"
    started = time.perf_counter()
    api_mb = write_queue(api_queue, api_lines(args.events)) / 1e6
    browser_mb = write_queue(browser_queue, browser_lines(args.browser_events)) / 1e6
    log(f"generated {args.events:,} API lines ({api_mb:.0f} MB) and {args.browser_events:,} browser "
        f"lines ({browser_mb:.0f} MB) in {time.perf_counter() - started:.0f}s")
    variants = {
        "deployed": dict(queue=api_queue, deployed=True),
        "rollups off": dict(queue=api_queue, rollups=False),
        "browser, enrichment on": dict(queue=browser_queue),
        "browser, enrichment off": dict(queue=browser_queue, enrichment=False),
        "browser, rollups off, enrichment on": dict(queue=browser_queue, rollups=False),
        "browser, rollups off, enrichment off": dict(queue=browser_queue, rollups=False,
                                                     enrichment=False),
    }
    results = {name: [] for name in variants}
    results["plain executemany"] = []
    results["rollups as a second step"] = []
    for number in range(args.rounds):
        for name, options in variants.items():
            options = dict(options)
            result = drain(options.pop("queue"), work, name.replace(" ", "").replace(",", "-"), **options)
            if name == "rollups off":
                results["rollups as a second step"].append(fold_later(result, work))
            if name == "deployed":
                results["plain executemany"].append(
                    dict(rate=plain_insert(result["data"] / "analytics.db", work / "plain.db")))
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{work / 'plain.db'}{suffix}").unlink(missing_ok=True)
            shutil.rmtree(result.pop("data"))
            results[name].append(result)
            log(f"round {number + 1}: {name:38} {result['rate']:9,.0f} events/s "
                f"({result['seconds']:.1f}s, peak RSS {result['peak_mb']:.0f} MB)")
        log(f"round {number + 1}: {'plain executemany':38} "
            f"{results['plain executemany'][-1]['rate']:9,.0f} rows/s")
    return dict(results=results, api_mb=api_mb, browser_mb=browser_mb)


def median_rate(results, name):
    return statistics.median(r["rate"] for r in results[name])


def paired_ratio(results, name, baseline):
    """The median of round-by-round ratios: load that comes and goes hits both sides of a pair."""
    return statistics.median(a["rate"] / b["rate"] for a, b in zip(results[name], results[baseline]))


def verdict(ok):
    return "met" if ok else "**missed**"


def summary_rows(measured, args):
    r = measured["results"]
    drain_rate = median_rate(r, "deployed")
    plain = paired_ratio(r, "deployed", "plain executemany")
    rollups = paired_ratio(r, "deployed", "rollups off")
    enrichment = paired_ratio(r, "browser, enrichment on", "browser, enrichment off")
    enrichment_alone = paired_ratio(r, "browser, rollups off, enrichment on",
                                    "browser, rollups off, enrichment off")
    peak = max(d["peak_mb"] for d in r["deployed"])
    browser_peak = max(d["peak_mb"] for d in r["browser, enrichment on"])
    return [
        (f"processor.py --once draining {args.events:,} API events: events/s", f"{drain_rate:,.0f}",
         "", "", f">= {TARGETS['drain']:,}/s", verdict(drain_rate >= TARGETS["drain"])),
        ("the same drain against a plain executemany of its rows", f"{drain_rate:,.0f}",
         f"plain executemany {median_rate(r, 'plain executemany'):,.0f}", f"{plain:.2f}",
         f">= {TARGETS['plain']}", verdict(plain >= TARGETS["plain"])),
        ("rollups on against rollups off (API events)", f"{drain_rate:,.0f}",
         f"rollups off {median_rate(r, 'rollups off'):,.0f}", f"{rollups:.2f}",
         f">= {TARGETS['rollups']}", verdict(rollups >= TARGETS["rollups"])),
        ("the other shape: drain without rollups, then fold them (rebuild-rollups)",
         f"{median_rate(r, 'rollups as a second step'):,.0f}",
         f"rollups off {median_rate(r, 'rollups off'):,.0f}",
         f"{paired_ratio(r, 'rollups as a second step', 'rollups off'):.2f}", "(reported)", ""),
        (f"enrichment on against off ({args.browser_events:,} browser events, rollups on)",
         f"{median_rate(r, 'browser, enrichment on'):,.0f}",
         f"enrichment off {median_rate(r, 'browser, enrichment off'):,.0f}", f"{enrichment:.2f}",
         f">= {TARGETS['enrichment']}", verdict(enrichment >= TARGETS["enrichment"])),
        ("enrichment on against off (browser events, rollups off)",
         f"{median_rate(r, 'browser, rollups off, enrichment on'):,.0f}",
         f"enrichment off {median_rate(r, 'browser, rollups off, enrichment off'):,.0f}",
         f"{enrichment_alone:.2f}", "(reported)", ""),
        (f"peak RSS of the processor draining {args.events:,} events", f"{peak:.0f} MB",
         f"queue file {measured['api_mb']:.0f} MB", "", f"< {TARGETS['rss']} MB",
         verdict(peak < TARGETS["rss"])),
        (f"peak RSS draining {args.browser_events:,} browser events (enrichment, rollups)",
         f"{browser_peak:.0f} MB", f"queue file {measured['browser_mb']:.0f} MB", "",
         f"< {TARGETS['rss']} MB", verdict(browser_peak < TARGETS["rss"])),
    ]


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def machine():
    def output(*command):
        try:
            return subprocess.run(command, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in output("lscpu").splitlines()
                  if line.startswith("Model name")), "unknown")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [("cores (nproc)", os.cpu_count()), ("CPU model", model), ("memory", f"{memory:.0f} GiB"),
            ("Python", platform.python_version()), ("SQLite", sqlite3.sqlite_version),
            ("load average at the start", " ".join(f"{x:.2f}" for x in os.getloadavg()))]


def render(measured, args, command, started, elapsed):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    rounds = [(name, number + 1, f"{result['rate']:,.0f}",
               f"{result.get('seconds', 0):.1f}" if "seconds" in result else "",
               f"{result['peak_mb']:.0f}" if "peak_mb" in result else "")
              for name, results in measured["results"].items() for number, result in enumerate(results)]
    return "\n".join([
        "# Processor benchmark", "",
        f"Run on {started:%Y-%m-%d %H:%M} UTC with `{command}` ({elapsed / 60:.1f} minutes), "
        f"code at `{commit}`.", "",
        table(("machine", ""), machine()), "",
        f"{args.rounds} interleaved rounds; each figure is the median over rounds, each ratio the "
        "median of round-by-round ratios. A drain is `processor.py --once` (or the same Processor "
        "built with the switches) from start to exit, on a fresh DATA_DIR.", "",
        "## Figures against their baselines", "",
        table(("figure", "measured", "baseline (same run)", "ratio", "target", "verdict"),
              summary_rows(measured, args)), "",
        "## Every drain", "",
        table(("variant", "round", "events/s", "seconds", "peak RSS MB"), rounds), "",
        "## What limits each figure", "", LIMITS, ""])


LIMITS = """\
- **Rollups.** Each batch is summed in memory first and every rollup table gets
  one statement per batch with one row per distinct key (README, "How it keeps
  events"). Counters collapse (10,000 events touch a few thousand counter rows);
  the exact unique-user sets cannot: every event with a user adds a row to the
  daily set (or sets a missing hour bit in it), to the all-time set and to the set of every property it has a value
  for (path, event_type, source; with enrichment also browser, os, device,
  referrer, UTM tags, props) unless that user is already there. With users drawn
  at random, as here, nearly all of those rows are new: about five B-tree inserts
  per API event (eight to ten per browser event) into tables that outgrow the
  page cache, where the plain insert appends one row at the end of the events
  table. Those inserts are most of the drain's time; summing in Python is most of
  the rest. Visitors who come back (sessions of several page views) make the sets
  collapse and the ratio rise; the data here does not have them.
- **The other shape** (drain without rollups, fold afterwards, as a fold by
  watermark would) does the same set inserts in larger chunks: the same work,
  later, with reports behind the stored events meanwhile.
- **Enrichment.** Parsing User-Agents, referrers and UTM tags is cached (the
  rollups-off pair shows what it costs); with rollups on, the properties it adds
  each get their own user sets, which is what the rollups-on pair mostly measures.
- **Against the plain executemany.** The baseline inserts the same rows and
  nothing else, so this ratio is the rollups ratio times the cost of reading
  and parsing the queue.
- **Memory.** SQLite's page cache (48 MiB) and one batch of rows; ua-parser's
  compiled rules add about 35 MB once browser events arrive."""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="API events to drain")
    parser.add_argument("--browser-events", type=int, default=1_000_000,
                        help="browser events for the enrichment figures")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", help=f"report file (default {RESULTS.relative_to(REPO)})")
    parser.add_argument("--drain", help=argparse.SUPPRESS)      # the child process of one drain
    parser.add_argument("--rollups", default="True", help=argparse.SUPPRESS)
    parser.add_argument("--enrichment", default="True", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drain:
        drain_in_child(args.drain, args.rollups == "True", args.enrichment == "True")
        return 0
    command = " ".join(["flock /tmp/bench.lock .venv/bin/python bench/processor_bench.py",
                        *(argv if argv is not None else sys.argv[1:])])
    started, clock = datetime.now(timezone.utc), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="processor-bench-") as work:
        try:
            measured = measure(args, Path(work))
        except BenchError as error:
            log(f"benchmark failed: {error}")
            return 1
    report = render(measured, args, command, started, time.monotonic() - clock)
    output = Path(args.output) if args.output else RESULTS
    output.write_text(report)
    log("\n" + table(("figure", "measured", "baseline (same run)", "ratio", "target", "verdict"),
                     summary_rows(measured, args)))
    log(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
