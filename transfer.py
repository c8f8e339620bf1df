"""Import events from a JSON-lines file, export them as JSON lines or CSV.

An import stores its position in the file with every batch (the same way the
processor stores its queue position), so running it again after an
interruption goes on where it stopped and never counts an event twice.
"""
import csv
import logging
import os

import orjson
from tqdm import tqdm

from enrich import NOTHING
from events import EVENT_COLUMNS, InvalidEvent, parse_json, validate_event

log = logging.getLogger("transfer")
IMPORT_BATCH = 10_000


def import_source(path):
    """The checkpoint name of an import: the file itself, not just its name."""
    stat = os.stat(path)
    return f"import:{os.path.realpath(path)}:{stat.st_dev}:{stat.st_ino}"


def import_file(store, path, show_progress=True):
    """Validate each line like POST /event and store the valid ones; returns (stored, rejected)."""
    source = import_source(path)
    offset, line_number = (int(part) for part in (store.checkpoint(source) or "0:0").split(":"))
    stored = rejected = 0
    with open(path, "rb") as file, tqdm(total=os.path.getsize(path), initial=offset, unit="B",
                                        unit_scale=True, disable=not show_progress,
                                        desc="import") as bar:
        file.seek(offset)
        while True:
            rows, consumed = [], 0
            for line in _lines(file, IMPORT_BATCH):
                consumed += len(line)
                line_number += 1
                if not line.strip():
                    continue
                try:
                    event = validate_event(parse_json(line))
                except InvalidEvent as error:
                    rejected += 1
                    log.warning("import line %d rejected: %s", line_number, error)
                    continue
                rows.append(tuple(event[column] for column in EVENT_COLUMNS) + (event["id"],) + NOTHING)
            if consumed == 0:
                break
            offset += consumed
            store.write(rows, source, f"{offset}:{line_number}")
            stored += len(rows)
            bar.update(consumed)
            bar.set_postfix(events=stored, rejected=rejected)
    return stored, rejected


def _lines(file, count):
    """Up to count complete lines; a last line without a newline counts as complete at EOF."""
    for _ in range(count):
        line = file.readline()
        if not line:
            return
        yield line


def export_events(connection, out, site_id, period, fmt="jsonl"):
    """Stream the events of a site (and period) in id order; returns how many."""
    sql = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events WHERE site_id = ?"
    params = [site_id]
    if not period.all_time:
        bounds = period.timestamp_bounds()
        sql += " AND timestamp >= ? AND timestamp <= ?"
        params += [bounds["first_ts"], bounds["last_ts"]]
    cursor = connection.execute(sql + " ORDER BY timestamp, id", params)
    writer = csv.writer(out) if fmt == "csv" else None
    if writer:
        writer.writerow(EVENT_COLUMNS)
    count = 0
    while rows := cursor.fetchmany(5000):
        for row in rows:
            if writer:
                writer.writerow(row)
            else:
                out.write(orjson.dumps(dict(zip(EVENT_COLUMNS, row))).decode() + "\n")
        count += len(rows)
    return count
