"""The HTTP API: takes events in, answers reports.

    POST /event    one event        POST /events   a batch (JSON array or NDJSON)
    GET  /stats    views, users and top paths of a site
    GET  /health   liveness and queue backlog

Ingestion only validates and appends to the queue; the processor stores.
"""
import logging
from datetime import date

import orjson
from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from config import load_config
from events import InvalidEvent, encode_event, parse_json, validate_event
from shared_queue import QueueUnavailable, open_queue
from store import open_store

log = logging.getLogger("ingestion_api")

MAX_STATS_LIMIT = 1000
JSON = "application/json"


class ApiError(Exception):
    """An error answered as {"error": message, ...extra} with a status code."""

    def __init__(self, message, status=400, **extra):
        super().__init__(message)
        self.body = {"error": message, **extra}
        self.status = status


def json_response(body, status=200):
    return Response(orjson.dumps(body) + b"\n", status=status, mimetype=JSON)


EVENT_RECEIVED = b'{"message":"Event received"}\n'


def create_app(config=None):
    config = config or load_config()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    queue = open_queue(config)
    store = open_store(config)
    store.migrate()
    store.close()
    app.extensions["analytics"] = {"config": config, "queue": queue, "store": store}

    @app.post("/event")
    def post_event():
        event = validate_event(parse_json(request.get_data(cache=False)))
        append([encode_event(event)])
        return Response(EVENT_RECEIVED, mimetype=JSON)

    @app.post("/events")
    def post_events():
        request.max_content_length = config.max_batch_bytes
        body = request.get_data(cache=False)
        if request.mimetype == "application/x-ndjson":
            items = parse_ndjson_items(body)
        else:
            items = parse_json(body)
            if not isinstance(items, list):
                raise ApiError("Invalid batch: expected a JSON array of events")
        if not items:
            raise ApiError("Invalid batch: no events")
        if len(items) > config.max_batch_events:
            raise ApiError(f"Too many events: {len(items)} in one batch, "
                           f"at most {config.max_batch_events}")
        lines = []
        for index, item in enumerate(items):
            try:
                lines.append(encode_event(validate_event(item)))
            except InvalidEvent as error:
                raise ApiError(str(error), index=index) from None
        append(lines)
        return json_response({"message": "Events received", "count": len(lines)})

    @app.get("/stats")
    def get_stats():
        site_id = request.args.get("site_id")
        if not site_id:
            raise ApiError("Missing required parameter: site_id")
        day = parse_day(request.args.get("date"))
        limit = parse_limit(request.args.get("limit"))
        report = store.stats(read_connection(), site_id, day, limit)
        return json_response({"site_id": site_id, "date": day and day.isoformat(), **report})

    @app.get("/health")
    def get_health():
        body = {"status": "healthy", "service": "ingestion_api"}
        try:
            queue.check_writable()
            body["queue_size"] = queue.size()
        except QueueUnavailable as error:
            body.update(status="unhealthy", reason=str(error))
            return json_response(body, 503)
        return json_response(body)

    def append(lines):
        try:
            queue.append(lines)
        except QueueUnavailable as error:
            log.error("queue append failed: %s", error)
            raise ApiError("Queue unavailable, event not stored; retry later", 503) from None

    def read_connection():
        if "db" not in g:
            g.db = store.connect(readonly=True)
        return g.db

    @app.teardown_appcontext
    def close_connection(exception):
        connection = g.pop("db", None)
        if connection is not None:
            connection.close()

    @app.errorhandler(ApiError)
    def handle_api_error(error):
        return json_response(error.body, error.status)

    @app.errorhandler(InvalidEvent)
    def handle_invalid_event(error):
        return json_response({"error": str(error)}, 400)

    @app.errorhandler(HTTPException)
    def handle_http_error(error):
        return json_response({"error": error.description}, error.code)

    return app


def parse_ndjson_items(body):
    """One event per non-blank line; index counts events, as in a JSON array."""
    items = []
    for index, line in enumerate(line for line in body.splitlines() if line.strip()):
        try:
            items.append(parse_json(line))
        except InvalidEvent as error:
            raise ApiError(str(error), index=index) from None
    return items


def parse_day(text):
    if text is None:
        return None
    try:
        if len(text) != 10:
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise ApiError("Invalid date format. Expected YYYY-MM-DD") from None


def parse_limit(text):
    if text is None:
        return 10
    if not text.isdigit() or not 1 <= int(text) <= MAX_STATS_LIMIT:
        raise ApiError(f"Invalid limit: expected a whole number from 1 to {MAX_STATS_LIMIT}")
    return int(text)


def __getattr__(name):
    """`ingestion_api:app` for gunicorn, built on first use so imports stay free of side effects."""
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)


if __name__ == "__main__":
    settings = load_config()
    create_app(settings).run(host=settings.host, port=settings.port, threaded=True)
