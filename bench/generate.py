"""Realistic analytics traffic as queue lines, deterministic for a seed.

    .venv/bin/python bench/generate.py --events 1000000 --out /tmp/events.jsonl [--seed 1]

The shape: 50 sites with Zipf-skewed traffic (the busiest takes ~22%),
200,000 users split among the sites in the same proportion (returning visitors
come back more often than newcomers), 5,000 paths with Zipf-skewed popularity
(each site ranks them differently), 90 UTC days with a daily and a weekly
rhythm and slow growth. Traffic comes in visits: a user views 1-8 pages in a
row, seconds to minutes apart, and now and then clicks, scrolls or signs up on
the page in between; about 85% of all events are page views. Some visits carry
no user id (no consent, no cookie), and a few custom events carry no path.

Lines come out in time order, as the API would have queued them, in exactly
the form events.encode_event(events.validate_event(...)) writes, the event id
included when the API gives one (its receive time in microseconds, then 64
random bits). They are built as strings for speed (about 110,000 lines a second on
one core); check() reads a sample back through events.row_from_line and
compares it with what encode_event and validate_event make of it.
"""
import argparse
import math
import random
import re
import sys
import time
from datetime import datetime, timedelta, timezone
from itertools import accumulate
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from events import encode_event, row_from_line, validate_event  # noqa: E402

# the fields the API queues, in its order; the generator writes the same
API_FIELDS = tuple(validate_event({"site_id": "s", "event_type": "e"}))
WITH_ID = API_FIELDS[0] == "id"
if set(API_FIELDS) - {"id"} != {"site_id", "event_type", "path", "user_id", "timestamp"} \
        or list(API_FIELDS).index("site_id") != int(WITH_ID):
    raise SystemExit(f"the API now queues {API_FIELDS}; bench/generate.py writes another shape")

SITES = 50
USERS = 200_000
PATHS = 5_000
DAYS = 90
FIRST_DAY = datetime(2025, 1, 1, tzinfo=timezone.utc)
SITE_SKEW = 1.0
PATH_SKEW = 1.0
PAGES_PER_VISIT = [30, 20, 15, 11, 8, 6, 5, 5]      # weights of 1..8 page views
OTHER_EVENTS = {"click": 45, "scroll": 25, "outbound_link": 15, "signup": 10, "purchase": 5}
OTHER_PER_VIEW = 0.15 / 0.85                         # so that 85% of events are page views
ANONYMOUS_VISITS = 0.08
PATHLESS_OTHER_EVENTS = 0.03
MEAN_SECONDS_BETWEEN_VIEWS = 45
MAX_SECONDS_BETWEEN_VIEWS = 300
HOUR_MS = 3_600_000
FIRST_EPOCH_MS = int(FIRST_DAY.timestamp() * 1000)
DAY_MS = 24 * HOUR_MS

SECTIONS = ["blog", "docs", "products", "help", "news", "category", "guides", "careers"]
WORDS = ("analytics privacy cookie dashboard pricing launch update guide setup install release "
         "team story design tips compare faq report weekly monthly api export import chart "
         "growth search mobile browser server cloud open source free trial plan").split()
TOP_PAGES = ["/", "/pricing", "/about", "/contact", "/login", "/signup", "/search", "/features"]


def zipf_cumulative(count, skew):
    return list(accumulate(1 / rank ** skew for rank in range(1, count + 1)))


def make_paths(rng):
    paths, seen = list(TOP_PAGES), set(TOP_PAGES)
    while len(paths) < PATHS:
        section = rng.choice(SECTIONS)
        slug = "-".join(rng.sample(WORDS, rng.randint(1, 3)))
        path = f"/{section}/{slug}" if rng.random() < 0.5 else f"/{section}/{slug}-{rng.randrange(1000)}"
        if path not in seen:
            seen.add(path)
            paths.append(path)
    head, rest = paths[:1], paths[1:]
    rng.shuffle(rest)          # "/" stays the most visited page everywhere
    return head + rest


def site_names():
    return [f"site{rank:02d}" for rank in range(1, SITES + 1)]


def hour_weights(rng):
    """Relative traffic of every hour: a daily wave, quieter weekends, slow growth, noise."""
    weights = []
    for day in range(DAYS):
        weekday = (FIRST_DAY + timedelta(days=day)).weekday()
        level = (0.7 if weekday >= 5 else 1.0) * (1 + 0.3 * day / DAYS) * rng.uniform(0.9, 1.1)
        for hour in range(24):
            weights.append(level * (1 + 0.7 * math.cos(2 * math.pi * (hour - 14) / 24)))
    return weights


def events_per_hour(total, weights):
    """Split total over the hours in proportion to weights, summing exactly to total."""
    scale = total / sum(weights)
    shares = [weight * scale for weight in weights]
    counts = [int(share) for share in shares]
    short = total - sum(counts)
    by_remainder = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])
    for index in by_remainder[:short]:
        counts[index] += 1
    return counts


def timestamp_parts():
    """Every minute of the period as 'YYYY-MM-DDTHH:MM:' and every millisecond of a minute as 'SS.mmmZ'."""
    minutes = [(FIRST_DAY + timedelta(minutes=m)).strftime("%Y-%m-%dT%H:%M:")
               for m in range(DAYS * 1440)]
    millis = [f"{ms // 1000:02d}.{ms % 1000:03d}Z" for ms in range(60_000)]
    return minutes, millis


def generate(out, total, seed=1, chunk_hours=6):
    """Write total queue lines to the file out; return a summary of what was written."""
    rng = random.Random(seed)
    random_ = rng.random
    expovariate = rng.expovariate
    choices = rng.choices

    sites = site_names()
    site_cum = zipf_cumulative(SITES, SITE_SKEW)
    site_share = [w / site_cum[-1] for w in (1 / r ** SITE_SKEW for r in range(1, SITES + 1))]
    paths = make_paths(rng)
    path_cum = zipf_cumulative(PATHS, PATH_SKEW)
    quoted = [orjson.dumps(path).decode() for path in paths]
    # each site ranks the paths differently; "/" is first everywhere
    site_paths = []
    for index in range(SITES):
        shift = (index * 619) % (PATHS - 1)
        site_paths.append([quoted[0]] + quoted[1 + shift:] + quoted[1:1 + shift])
    users = []
    for index in range(SITES):
        count = max(50, round(USERS * site_share[index]))
        users.append([f',"user_id":"{rng.getrandbits(64):016x}","timestamp":"' for _ in range(count)])
    anonymous = ',"user_id":null,"timestamp":"'
    other_types = list(OTHER_EVENTS)
    other_cum = list(accumulate(OTHER_EVENTS.values()))
    heads = [{kind: f'"site_id":"{site}","event_type":"{kind}","path":'
              for kind in ["page_view"] + other_types} for site in sites]
    getrandbits = rng.getrandbits
    pages_cum = list(accumulate(PAGES_PER_VISIT))
    page_counts = list(range(1, len(PAGES_PER_VISIT) + 1))
    minutes, millis = timestamp_parts()
    last_ms = DAYS * 24 * HOUR_MS - 1
    hourly = events_per_hour(total, hour_weights(rng))

    views = anonymous_events = written = 0
    site_days = [0] * (SITES * DAYS)
    carry = []
    with open(out, "w", buffering=8 * 1024 * 1024) as file:
        for first_hour in range(0, len(hourly), chunk_hours):
            pending = carry
            for hour in range(first_hour, min(first_hour + chunk_hours, len(hourly))):
                quota, start = hourly[hour], hour * HOUR_MS
                while quota > 0:
                    site = choices(range(SITES), cum_weights=site_cum)[0]
                    site_users = users[site]
                    if random_() < ANONYMOUS_VISITS:
                        user = anonymous
                    else:    # returning visitors: low indexes come back more often
                        user = site_users[int(len(site_users) * random_() ** 2)]
                    head = heads[site]
                    pages = choices(page_counts, cum_weights=pages_cum)[0]
                    moment = start + int(random_() * HOUR_MS)
                    before = quota
                    for path in choices(site_paths[site], cum_weights=path_cum, k=pages):
                        if quota == 0:
                            break
                        pending.append((moment, site, head["page_view"] + path + user))
                        quota -= 1
                        views += 1
                        gap = min(2000 + int(expovariate(1 / MEAN_SECONDS_BETWEEN_VIEWS) * 1000),
                                  MAX_SECONDS_BETWEEN_VIEWS * 1000)
                        if quota and random_() < OTHER_PER_VIEW:
                            kind = choices(other_types, cum_weights=other_cum)[0]
                            where = "null" if random_() < PATHLESS_OTHER_EVENTS else path
                            pending.append((moment + int(gap * random_()), site, head[kind] + where + user))
                            quota -= 1
                        moment += gap
                    if user is anonymous:
                        anonymous_events += before - quota
            boundary = min(first_hour + chunk_hours, len(hourly)) * HOUR_MS
            pending.sort()
            split = next_index(pending, boundary) if boundary <= last_ms else len(pending)
            carry = pending[split:]
            lines = []
            for moment, site, body in pending[:split]:
                moment = min(moment, last_ms)      # the last visits do not run past the period
                site_days[site * DAYS + moment // DAY_MS] += 1
                stamp = minutes[moment // 60_000] + millis[moment % 60_000] + '"}\n'
                if WITH_ID:     # received when it happened, give or take a millisecond
                    micros = (FIRST_EPOCH_MS + moment) * 1000 + getrandbits(10)
                    lines.append(f'{{"id":"{micros:014x}{getrandbits(64):016x}",' + body + stamp)
                else:
                    lines.append("{" + body + stamp)
            file.write("".join(lines))
            written += len(lines)
    per_site = [sum(site_days[site * DAYS:(site + 1) * DAYS]) for site in range(SITES)]
    busiest = max(range(SITES), key=per_site.__getitem__)
    first = FIRST_DAY.date()
    return {"events": written, "page_views": views, "anonymous_events": anonymous_events,
            "sites": sites, "per_site": dict(zip(sites, per_site)), "busiest_site": sites[busiest],
            "busiest_days": {first + timedelta(days=day): site_days[busiest * DAYS + day]
                             for day in range(DAYS)},
            "first_day": first, "days": DAYS}


def next_index(pending, boundary):
    """Index of the first event at or after boundary in the sorted list."""
    low, high = 0, len(pending)
    while low < high:
        middle = (low + high) // 2
        if pending[middle][0] < boundary:
            low = middle + 1
        else:
            high = middle
    return low


def check(path, sample_every=997, limit=20_000):
    """Read a sample back the way the processor does; each line must be what the API writes."""
    checked, previous = 0, ""
    with open(path, "rb") as file:
        for number, line in enumerate(file):
            timestamp = line[-27:-3].decode()
            if timestamp < previous:
                raise AssertionError(f"line {number + 1} is out of time order")
            previous = timestamp
            if number % sample_every:
                continue
            row = row_from_line(line.rstrip(b"\n"))
            event = dict(zip(("site_id", "event_type", "path", "user_id", "timestamp"), row))
            again = validate_event(event, now=datetime(2100, 1, 1, tzinfo=timezone.utc))
            written = orjson.loads(line)
            if WITH_ID:
                assert re.fullmatch(r"[0-9a-f]{30}", written["id"]), line
                assert len(again["id"]) == 30, again
                again["id"] = written["id"]
            assert encode_event(again) == line, (line, encode_event(again))
            checked += 1
            if checked >= limit:
                break
    return checked


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write realistic analytics events as queue lines.")
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True, help="the queue file to write")
    parser.add_argument("--check", action="store_true", help="read a sample back and verify it")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    summary = generate(args.out, args.events, args.seed)
    seconds = time.perf_counter() - began
    print(f"{summary['events']:,} events in {seconds:.1f}s ({summary['events'] / seconds:,.0f}/s) "
          f"to {args.out}; page views {summary['page_views'] / summary['events']:.1%}, "
          f"without user id {summary['anonymous_events'] / summary['events']:.1%}, "
          f"busiest site {summary['busiest_site']} "
          f"{summary['per_site'][summary['busiest_site']] / summary['events']:.1%}")
    if args.check:
        print(f"checked {check(args.out):,} sampled lines against events.row_from_line")


if __name__ == "__main__":
    main()
