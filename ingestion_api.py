"""The HTTP API: takes events in, answers reports.

    POST /event               one event
    POST /events              a batch (JSON array or NDJSON)
    GET  /stats               views, users and top paths of a site
    GET  /stats/timeseries    views and users per day or hour
    GET  /stats/breakdown     views, events and users per value of a property
    GET  /stats/props         the names of the custom-event props a site sent
    GET  /stats/sites         the sites that have data, with their all-time totals
    GET  /health              liveness and queue backlog
    POST /api/event           the Plausible Events API, for browser trackers
    GET  /js/script.js        our tracker script
    GET  /                    the dashboard (static/dashboard.*), which reads /stats*
    GET  /openapi.json        the OpenAPI description of all of these (openapi.yaml)
    GET  /metrics             Prometheus metrics (metrics.py)

Ingestion (ingest.py, whose FastPath answers the ingest POSTs before Flask
does) only validates and appends to the queue; the processor stores.
"""
import gzip
import hashlib
import hmac
import logging
import os
import re
import sqlite3
import time
from datetime import timedelta

import orjson
import yaml
from flask import Flask, Response, g, request
from flask_cors import CORS
from werkzeug.exceptions import BadRequest, ClientDisconnected, HTTPException, RequestEntityTooLarge

from config import (
    ConfigurationError, check_host, load_config, stop_at_start, warn_of_a_keys_file_others_may_read,
    warn_of_misspelled_settings)
from events import InvalidEvent
from ingest import (
    ANY_ORIGIN, INGEST_PATHS, NOSNIFF, ApiError, FastPath, IncompleteBody, Ingest, body_too_large,
    error_answer, refuse_compressed)
from logs import log_to_stderr
from metrics import ApiMetrics, NoMetrics
from query_params import InvalidParameter, QueryParams
from rate_limit import ingest_rate_limit
from retention import utc_today
from shared_queue import QueueUnavailable, open_queue
from store import StoreUnavailable, migrate_store, open_store, unavailable_or_bug
from tracking import Visitors

log = logging.getLogger("ingestion_api")

JSON = "application/json"


def json_response(body, status=200):
    return Response(orjson.dumps(body) + b"\n", status=status, mimetype=JSON)


def answer_response(answer):
    response = Response(answer.body, status=answer.status, content_type=answer.content_type)
    response.headers.extend(answer.headers)
    return response


def create_app(config=None):
    config = config or load_config()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    queue = open_queue(config)
    store = open_store(config)
    try:
        store.migrate()         # done at start already; a worker restarted in an outage boots all the same
    except StoreUnavailable as error:
        log.warning("database unavailable: %s; reports answer 503 until it is back", error)
    store.close()
    metrics = ApiMetrics(config, queue) if config.metrics else NoMetrics()
    ingest = Ingest(config, queue, Visitors(store), metrics)
    app.extensions["analytics"] = {"config": config, "queue": queue, "store": store}
    if config.metrics:
        register_metrics(app, metrics)     # first, so that its clock starts before any other hook
    rate_limit = ingest_rate_limit(config, ingest.client_address, store)
    register_ingestion(app, config, queue, ingest, rate_limit)
    register_tracking(app, ingest, rate_limit)
    register_report_access(app, config)
    register_reports(app, config, store)
    register_openapi(app)
    register_dashboard(app)
    app.after_request(content_type_is_final)
    register_errors(app)
    app.wsgi_app = FastPath(app.wsgi_app, ingest, rate_limit)
    return app


def register_ingestion(app, config, queue, ingest, rate_limit):
    # POSTs with a Content-Length are answered by FastPath before Flask; these
    # routes answer the rest (chunked uploads) alike, and give Flask the URL map.
    @app.route("/event", methods=["POST", "OPTIONS"])
    @rate_limit.limit
    def post_event():
        if request.method == "OPTIONS":
            return preflight_response()
        return answer_response(ingest.event(whole_body()))

    @app.route("/events", methods=["POST", "OPTIONS"])
    @rate_limit.limit
    def post_events():
        if request.method == "OPTIONS":
            return preflight_response()
        request.max_content_length = config.max_batch_bytes
        return answer_response(ingest.events(whole_body(), request.mimetype))

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


def whole_body():
    """The request body, or 413 when it is over request.max_content_length, chunked or not.

    For a body without a Content-Length, werkzeug reads up to the limit and stops
    there without a word: a body cut at the limit reads one byte more.
    """
    refuse_compressed(request.headers.get("Content-Encoding", ""))
    try:
        body = request.get_data(cache=False)
    except ClientDisconnected:      # a chunked body without its last chunk
        raise IncompleteBody() from None
    except RequestEntityTooLarge:
        raise body_too_large(request.max_content_length) from None
    except HTTPException:
        raise
    except Exception as error:      # the server could not parse the body: gunicorn, a bad chunk size
        raise BadRequest(f"Invalid request body: {type(error).__name__}") from None
    if not request.content_length and len(body) >= request.max_content_length \
            and request.environ["wsgi.input"].read(1):
        raise body_too_large(request.max_content_length)
    return body


def register_tracking(app, ingest, rate_limit):
    script = TrackerScript(os.path.join(app.root_path, "static", "script.js"))

    @app.route("/api/event", methods=["POST", "OPTIONS"])
    @rate_limit.limit
    def plausible_event():
        if request.method == "OPTIONS":
            return preflight_response()
        answer = ingest.plausible(request.headers.get("User-Agent", ""),
                                  whole_body,
                                  request.remote_addr, request.headers)
        return answer_response(answer)

    @app.get("/js/script.js")
    def tracker_script():
        return script.response(request)

    @app.after_request
    def any_origin_may_send_events(response):
        # every answer, errors and 413s included, or browsers report a CORS failure instead
        if request.path in INGEST_PATHS:
            response.headers.extend(ANY_ORIGIN)
        return response


def preflight_response():
    """What a browser asks before it sends a POST with a JSON Content-Type from another site.
    Chromium keeps the answer two hours at most, and five seconds without a Max-Age."""
    response = Response(b"", status=204, mimetype="text/plain")
    response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = "Content-Type"
    response.headers["Access-Control-Max-Age"] = "7200"
    return response


class TrackerScript:
    """static/script.js as served: without comment lines and indentation, gzipped on request."""

    def __init__(self, path):
        with open(path, encoding="utf-8") as file:
            lines = [line.strip() for line in file if not line.lstrip().startswith("//")]
        self.body = "\n".join(line for line in lines if line).encode()
        self.gzipped = gzip.compress(self.body, 9, mtime=0)
        self.etag = hashlib.sha256(self.body).hexdigest()[:16]

    def response(self, request):
        # werkzeug weighs the q-values: "gzip;q=0" refuses gzip
        gzipped = request.accept_encodings["gzip"] > 0
        response = Response(self.gzipped if gzipped else self.body, mimetype="application/javascript")
        if gzipped:
            response.headers["Content-Encoding"] = "gzip"
        response.headers["Vary"] = "Accept-Encoding"
        response.headers["Cache-Control"] = "public, max-age=3600"
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.set_etag(self.etag + ("-gzip" if gzipped else ""))     # one tag per body
        return response.make_conditional(request)


def content_type_is_final(response):
    response.headers.extend(NOSNIFF)        # as FastPath's answers have it
    return response


def register_metrics(app, metrics):
    @app.before_request
    def start_clock():
        g.started = time.perf_counter()

    @app.after_request
    def count_answer(response):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.answered(endpoint, response.status_code, time.perf_counter() - g.started,
                         ingest=endpoint in INGEST_PATHS)
        return response

    @app.get("/metrics")
    def get_metrics():
        body, content_type = metrics.exposition()
        return Response(body, content_type=content_type)


def register_report_access(app, config):
    """API keys and CORS for /stats*."""
    if config.api_keys:
        keys = [key.encode() for key in config.api_keys]
    else:
        keys = None
        log.warning("no API keys are set (API_KEYS / API_KEYS_FILE): reports under /stats are public")
    if config.cors_origins:
        CORS(app, resources={r"/stats*": {"origins": exact_origins(config.cors_origins)}},
             methods=["GET", "HEAD", "OPTIONS"], allow_headers=["Authorization"], max_age=600)

    @app.before_request
    def require_api_key():
        is_report = request.path == "/stats" or request.path.startswith("/stats/")
        if keys is None or not is_report or request.method == "OPTIONS":
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        given = given.strip().encode()
        # compare with every key so the time taken does not say which one nearly matched
        matches = [hmac.compare_digest(given, key) for key in keys]
        if scheme.lower() != "bearer" or not any(matches):
            response = json_response({"error": "Missing or invalid API key: send "
                                      "Authorization: Bearer <key>"}, 401)
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return None


def register_reports(app, config, store):
    def reports():
        if "db" not in g:
            g.db = store.reader()
        # the days the processor's retention deletes (or has deleted) read as empty, in every answer
        days = config.rollup_retention_days
        return store.reports(g.db, first_day=utc_today() - timedelta(days=days) if days else None)

    @app.teardown_appcontext
    def release_connection(exception):
        connection = g.pop("db", None)
        if connection is not None:
            store.release(connection)

    @app.get("/stats")
    def get_stats():
        params = QueryParams(request.args, config)
        site_id, period, limit = params.site_id(), params.period(), params.limit()
        report = reports().stats(site_id, period, limit)
        # the original shape: the range asked for is not echoed, only date
        return json_response({"site_id": site_id, "date": request.args.get("date"), **report})

    @app.get("/stats/timeseries")
    def get_timeseries():
        params = QueryParams(request.args, config)
        site_id, interval = params.site_id(), params.interval()
        period = params.series_period(interval)
        points = reports().timeseries(site_id, period, interval)
        return json_response({"site_id": site_id, "interval": interval,
                              **params.period_fields(period), "points": points})

    @app.get("/stats/sites")
    def get_sites():
        return json_response({"sites": reports().sites()})

    @app.get("/stats/breakdown")
    def get_breakdown():
        params = QueryParams(request.args, config)
        site_id, prop, period, limit = (params.site_id(), params.property(),
                                        params.period(), params.limit())
        results = reports().breakdown(site_id, prop, period, limit)
        return json_response({"site_id": site_id, "property": prop,
                              **params.period_fields(period), "results": results})

    @app.get("/stats/props")
    def get_prop_keys():
        params = QueryParams(request.args, config)
        site_id, period, limit = params.site_id(), params.period(), params.limit()
        keys = reports().prop_keys(site_id, period, limit)
        return json_response({"site_id": site_id, **params.period_fields(period), "props": keys})


# the page keeps an API key in storage: no script, style, frame, base URL or form target from
# anywhere else, no framing (X-Frame-Options for browsers before frame-ancestors), and its address
# told to no one
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def register_dashboard(app):
    @app.get("/")
    def dashboard():
        response = app.send_static_file("dashboard.html")
        response.headers.update(DASHBOARD_HEADERS)
        return response


def exact_origins(origins):
    """flask-cors reads an origin holding [ (an IPv6 host), * or ? as a regular expression matched
    from the start only: "https://*.corp.example" let in https://corp.example.attacker.net. Each
    origin must match itself, whole."""
    return [origin if origin == "*" else re.compile(re.escape(origin) + r"\Z") for origin in origins]


def register_openapi(app):
    # read once: the file is part of the code, so it cannot change while the app runs
    with open(os.path.join(app.root_path, "openapi.yaml"), encoding="utf-8") as file:
        document = orjson.dumps(yaml.safe_load(file))

    @app.get("/openapi.json")
    def openapi():
        return Response(document, mimetype=JSON)


def register_errors(app):
    @app.errorhandler(ApiError)
    @app.errorhandler(StoreUnavailable)
    @app.errorhandler(InvalidEvent)
    @app.errorhandler(InvalidParameter)
    @app.errorhandler(HTTPException)
    def handle_error(error):
        return answer_response(error_answer(error))

    @app.errorhandler(sqlite3.DatabaseError)
    def handle_database_error(error):
        # a report's query on a file that is not (or no longer) a database is an outage: 503
        outage = unavailable_or_bug(error, app.extensions["analytics"]["config"].database_path)
        if outage is error:
            raise error
        return answer_response(error_answer(outage))


# the settings gunicorn's master checked, which gunicorn.conf.py's post_fork hands to each worker
checked_config = None


def __getattr__(name):
    """`ingestion_api:app` for gunicorn, built on first use so imports stay free of side effects."""
    if name == "app":
        globals()["app"] = create_app(checked_config)
        return globals()["app"]
    raise AttributeError(name)


if __name__ == "__main__":
    try:
        settings = load_config()
        check_host(settings.host)
        log_to_stderr(settings)
        warn_of_misspelled_settings()
        warn_of_a_keys_file_others_may_read()
        migrate_store(settings)
        application = create_app(settings)
    except ConfigurationError as error:      # in the words gunicorn.conf.py uses
        stop_at_start(f"configuration error: {error}")
    except StoreUnavailable as error:
        stop_at_start(f"cannot start: {error}")
    except KeyboardInterrupt:                 # Ctrl-C while waiting for the database
        raise SystemExit(130) from None
    application.run(host=settings.host, port=settings.port, threaded=True)
