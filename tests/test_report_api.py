"""The reporting endpoints: parameters, shapes, API keys and CORS."""
import logging
import shutil
import sqlite3
from pathlib import Path

import pytest

from events import encode_event, validate_event
from ingestion_api import create_app
from shared_queue import open_queue
from store import StoreUnavailable, unavailable_or_bug

ALL_BACKENDS = True

EVENTS = [
    {"site_id": "s", "event_type": "page_view", "path": "/a", "user_id": "u1", "timestamp": "2025-05-01T10:15:00Z"},
    {"site_id": "s", "event_type": "page_view", "path": "/a", "user_id": "u2", "timestamp": "2025-05-01T11:00:00Z"},
    {"site_id": "s", "event_type": "page_view", "path": "/b", "user_id": "u1", "timestamp": "2025-05-03T09:00:00Z"},
    {"site_id": "s", "event_type": "signup", "path": "/b", "user_id": "u3", "timestamp": "2025-05-03T09:30:00Z"},
]


@pytest.fixture
def loaded(client, drain):
    assert client.post("/events", json=EVENTS).status_code == 200
    drain()
    return client


def get(client, url, status=200, **params):
    response = client.get(url, query_string=params)
    assert response.status_code == status, response.get_json()
    return response.get_json()


def test_stats_over_a_range(loaded):
    body = get(loaded, "/stats", site_id="s", **{"from": "2025-05-01", "to": "2025-05-02"})
    assert body == {"site_id": "s", "date": None, "total_views": 2, "unique_users": 2,
                    "top_paths": [{"path": "/a", "views": 2}]}


def test_date_is_shorthand_for_a_one_day_range(loaded):
    one_day = get(loaded, "/stats", site_id="s", date="2025-05-03")
    ranged = get(loaded, "/stats", site_id="s", **{"from": "2025-05-03", "to": "2025-05-03"})
    assert one_day["unique_users"] == ranged["unique_users"] == 2
    assert one_day["top_paths"] == ranged["top_paths"] == [{"path": "/b", "views": 1}]


def test_timeseries_by_day_has_empty_days_as_zeros(loaded):
    body = get(loaded, "/stats/timeseries", site_id="s", interval="day",
               **{"from": "2025-05-01", "to": "2025-05-03"})
    assert body == {"site_id": "s", "interval": "day", "from": "2025-05-01", "to": "2025-05-03",
                    "points": [{"date": "2025-05-01", "views": 2, "unique_users": 2},
                               {"date": "2025-05-02", "views": 0, "unique_users": 0},
                               {"date": "2025-05-03", "views": 1, "unique_users": 2}]}


def test_timeseries_by_hour(loaded):
    points = get(loaded, "/stats/timeseries", site_id="s", interval="hour",
                 date="2025-05-01")["points"]
    assert len(points) == 24
    assert points[10] == {"date": "2025-05-01T10:00:00Z", "views": 1, "unique_users": 1}
    assert points[11] == {"date": "2025-05-01T11:00:00Z", "views": 1, "unique_users": 1}


def test_timeseries_by_hour_covers_up_to_31_days(client):
    points = get(client, "/stats/timeseries", site_id="s", interval="hour",
                 **{"from": "2025-01-01", "to": "2025-01-31"})["points"]
    assert len(points) == 31 * 24
    assert (points[0]["date"], points[-1]["date"]) == ("2025-01-01T00:00:00Z", "2025-01-31T23:00:00Z")


def test_unique_users_over_a_range_count_every_day_of_it(client, drain):
    events = [{"site_id": "s", "event_type": "page_view", "user_id": user, "timestamp": moment}
              for user, moment in [("u1", "2025-05-01T10:00:00Z"), ("u2", "2025-06-01T10:00:00Z")]]
    assert client.post("/events", json=events).status_code == 200
    drain()
    for first, last, users in [("2025-05-01", "2025-06-01", 2), ("2025-05-01", "2025-05-01", 1),
                               ("2025-06-01", "2025-06-01", 1), ("2025-05-02", "2025-05-31", 0)]:
        body = get(client, "/stats", site_id="s", **{"from": first, "to": last})
        assert body["unique_users"] == users, (first, last)


@pytest.mark.parametrize("interval, label", [("day", "0055-04-04"), ("hour", "0055-04-04T00:00:00Z")])
def test_timeseries_labels_early_years_with_four_digits(client, interval, label):
    points = get(client, "/stats/timeseries", site_id="s", interval=interval, date="0055-04-04")["points"]
    assert points[0] == {"date": label, "views": 0, "unique_users": 0}


def test_breakdown_by_path(loaded):
    body = get(loaded, "/stats/breakdown", site_id="s", property="path")
    assert body == {"site_id": "s", "property": "path", "from": None, "to": None, "results": [
        {"value": "/a", "views": 2, "events": 2, "unique_users": 2},
        {"value": "/b", "views": 1, "events": 2, "unique_users": 2}]}


def test_breakdown_ties_in_views_are_ordered_by_events_then_value(client, drain):
    events = [("/x", "page_view"), ("/x", "click"), ("/x", "click"), ("/w", "page_view"), ("/w", "click"),
              ("/y", "page_view"), ("/v", "page_view")]
    assert client.post("/events", json=[{"site_id": "s", "event_type": kind, "path": path}
                                        for path, kind in events]).status_code == 200
    drain()
    results = get(client, "/stats/breakdown", site_id="s", property="path")["results"]
    assert [(row["value"], row["views"], row["events"]) for row in results] == [
        ("/x", 1, 3), ("/w", 1, 2), ("/v", 1, 1), ("/y", 1, 1)]


def test_breakdown_by_event_type_with_a_limit(loaded):
    body = get(loaded, "/stats/breakdown", site_id="s", property="event_type", limit=1)
    assert body["results"] == [{"value": "page_view", "views": 3, "events": 3, "unique_users": 2}]


def test_props_lists_the_names_of_the_custom_event_props_sent_in_the_range(client, config, drain):
    # as /api/event queues a custom event: props come only from browser trackers
    sent = [("s", "Signup", {"plan": "pro", "Seats": "2"}, "2025-05-01T10:00:00Z"),
            ("s", "Download", {"file": "a.pdf"}, "2025-05-03T10:00:00Z"),
            ("other", "Signup", {"colour": "red"}, "2025-05-03T10:00:00Z")]
    open_queue(config).append([encode_event({**validate_event({"site_id": site, "event_type": name,
                                                               "timestamp": moment}),
                                             "visitor_id": "v1", "props": props})
                               for site, name, props, moment in sent])
    drain()
    assert get(client, "/stats/props", site_id="s") == {
        "site_id": "s", "from": None, "to": None, "props": ["Seats", "file", "plan"]}
    assert get(client, "/stats/props", site_id="s", date="2025-05-03")["props"] == ["file"]
    assert get(client, "/stats/props", site_id="s", limit=2)["props"] == ["Seats", "file"]
    assert get(client, "/stats/props", site_id="absent")["props"] == []
    values = get(client, "/stats/breakdown", site_id="s", property="props.Seats")["results"]
    assert [row["value"] for row in values] == ["2"]


def test_sites_lists_every_site_with_data_and_its_totals(client, drain):
    other = [{"site_id": "other", "event_type": "page_view", "path": "/", "user_id": "u9"},
             {"site_id": "only-events", "event_type": "signup"}]
    assert client.post("/events", json=EVENTS + other).status_code == 200
    drain()
    assert get(client, "/stats/sites") == {"sites": [
        {"site_id": "only-events", "total_views": 0, "unique_users": 0},
        {"site_id": "other", "total_views": 1, "unique_users": 1},
        {"site_id": "s", "total_views": 3, "unique_users": 3}]}
    for site in ("s", "other"):
        stats = get(client, "/stats", site_id=site)
        assert {"site_id": site, "total_views": stats["total_views"],
                "unique_users": stats["unique_users"]} in get(client, "/stats/sites")["sites"]


def test_sites_is_empty_before_any_data(client):
    assert get(client, "/stats/sites") == {"sites": []}


@pytest.mark.parametrize("url,params,named", [
    ("/stats", {"site_id": "s", "from": "2025-05-01"}, "to"),
    ("/stats", {"site_id": "s", "to": "2025-05-01"}, "from"),
    ("/stats", {"site_id": "s", "from": "2025-05-xx", "to": "2025-05-01"}, "from"),
    ("/stats", {"site_id": "s", "from": "2025-05-01", "to": "2025-13-01"}, "to"),
    ("/stats", {"site_id": "s", "from": "2025-05-02", "to": "2025-05-01"}, "before from"),
    ("/stats", {"site_id": "s", "from": "2000-01-01", "to": "2025-05-01"}, "at most 3660"),
    ("/stats", {"site_id": "s", "date": "2025-05-01", "from": "2025-05-01", "to": "2025-05-01"}, "date"),
    ("/stats", {"site_id": "s", "date": "2025-05-01", "from": "2025-05-01"}, "date"),
    ("/stats", {"site_id": "s", "date": "2025-05-01", "to": "2025-05-01"}, "date"),
    ("/stats/timeseries", {"from": "2025-05-01", "to": "2025-05-01"}, "site_id"),
    ("/stats/timeseries", {"site_id": "s", "interval": "week"}, "interval"),
    ("/stats/timeseries", {"site_id": "s", "interval": "hour", "from": "2025-01-01", "to": "2025-05-01"}, "interval=hour"),
    ("/stats/timeseries", {"site_id": "s", "interval": "hour", "from": "2025-01-01", "to": "2025-02-01"},
     "is 32 days, at most 31 with interval=hour"),
    ("/stats/breakdown", {"site_id": "s"}, "property"),
    ("/stats/breakdown", {"site_id": "s", "property": "colour"}, "property"),
    ("/stats/breakdown", {"site_id": "s", "property": "path", "limit": "0"}, "limit"),
    ("/stats/props", {}, "site_id"),
    ("/stats/props", {"site_id": "s", "limit": "1001"}, "limit"),
    ("/stats/props", {"site_id": "s", "from": "2025-05-01"}, "to"),
])
def test_bad_parameters_are_400s_naming_the_parameter(client, url, params, named):
    body = get(client, url, status=400, **params)
    assert named in body["error"]


def test_range_limit_is_configurable(config):
    client = create_app(config.with_overrides(report_max_days=7)).test_client()
    body = get(client, "/stats", status=400, site_id="s", **{"from": "2025-05-01", "to": "2025-05-08"})
    assert "at most 7" in body["error"]
    get(client, "/stats", site_id="s", **{"from": "2025-05-01", "to": "2025-05-07"})
    # the default daily series (30 days) shrinks to the limit rather than break it
    assert len(get(client, "/stats/timeseries", site_id="s")["points"]) == 7


# -- API keys ----------------------------------------------------------------

@pytest.fixture
def keyed(config):
    return create_app(config.with_overrides(api_keys=("first-key", "second-key"))).test_client()


@pytest.mark.parametrize("url", ["/stats?site_id=s", "/stats/timeseries?site_id=s",
                                 "/stats/breakdown?site_id=s&property=path", "/stats/props?site_id=s",
                                 "/stats/sites"])
def test_reports_need_a_key_when_keys_are_set(keyed, url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "first-key"},
                    {"Authorization": "Basic first-key"}):
        response = keyed.get(url, headers=headers)
        assert response.status_code == 401
        assert "API key" in response.get_json()["error"]
    # the scheme's name is case-insensitive (RFC 9110)
    for authorization in ("Bearer first-key", "Bearer second-key", "bearer first-key", "BEARER  second-key"):
        assert keyed.get(url, headers={"Authorization": authorization}).status_code == 200


def test_ingestion_and_health_stay_open_with_keys(keyed):
    assert keyed.post("/event", json={"site_id": "s", "event_type": "v"}).status_code == 200
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/statsfoo").status_code == 404       # no report: nothing to protect


def test_keys_can_come_from_a_file(tmp_path):
    from config import load_config
    keys_file = tmp_path / "keys"
    keys_file.write_text("# dashboard\nfile-key\n")
    config = load_config(environ={"DATA_DIR": str(tmp_path), "API_KEYS_FILE": str(keys_file)})
    client = create_app(config).test_client()
    assert client.get("/stats?site_id=s").status_code == 401
    assert client.get("/stats?site_id=s", headers={"Authorization": "Bearer file-key"}).status_code == 200


def test_without_keys_a_warning_says_reports_are_public(config, caplog):
    with caplog.at_level(logging.WARNING, logger="ingestion_api"):
        create_app(config)
    assert "reports under /stats are public" in caplog.text


# -- CORS --------------------------------------------------------------------

def test_reports_are_readable_from_a_configured_origin(config):
    client = create_app(config.with_overrides(cors_origins=("https://dash.example",),
                                              api_keys=("k",))).test_client()
    preflight = client.open("/stats", method="OPTIONS", headers={
        "Origin": "https://dash.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "Authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://dash.example"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert preflight.headers["Access-Control-Allow-Methods"] == "GET, HEAD, OPTIONS"     # reports are read-only
    response = client.get("/stats?site_id=s", headers={"Origin": "https://dash.example",
                                                        "Authorization": "Bearer k"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://dash.example"
    other = client.get("/stats?site_id=s", headers={"Origin": "https://evil.example",
                                                     "Authorization": "Bearer k"})
    assert "Access-Control-Allow-Origin" not in other.headers


@pytest.mark.embedded
@pytest.mark.parametrize("listed, origin, allowed", [
    ("http://[::1]:8080", "http://[::1]:8080", True),
    ("http://[::1]:8080", "http://1:8080", False),
    ("https://dash.example", "https://dash.example.attacker.example", False),
    ("https://dash.example", "null", False),
])
def test_only_the_origins_listed_read_reports_each_exactly_as_written(config, listed, origin, allowed):
    client = create_app(config.with_overrides(cors_origins=(listed,), api_keys=("k",))).test_client()
    response = client.get("/stats?site_id=s", headers={"Origin": origin, "Authorization": "Bearer k"})
    assert response.status_code == 200
    assert response.headers.get("Access-Control-Allow-Origin") == (origin if allowed else None)
    assert "Access-Control-Allow-Credentials" not in response.headers


# -- the connection reports read through ----------------------------------------

def test_reports_see_every_batch_stored_after_the_last_request(loaded, drain):
    assert get(loaded, "/stats", site_id="s")["total_views"] == 3
    for expected in (4, 5):
        assert loaded.post("/event", json={"site_id": "s", "event_type": "page_view"}).status_code == 200
        drain()
        assert get(loaded, "/stats", site_id="s")["total_views"] == expected


@pytest.mark.embedded
def test_a_database_file_put_in_place_of_the_old_one_is_read_not_the_deleted_one(client, drain, config,
                                                                                tmp_path):
    assert client.post("/events", json=EVENTS).status_code == 200
    drain().close()
    assert get(client, "/stats", site_id="s")["total_views"] == 3
    # a restore from a backup: another database, moved in while the API runs
    (tmp_path / "backup").mkdir()
    backup = config.with_overrides(data_dir=str(tmp_path / "backup"))
    assert create_app(backup).test_client().post("/events", json=EVENTS[:1]).status_code == 200
    drain(data_dir=backup.data_dir).close()
    for suffix in ("-wal", "-shm"):
        Path(config.database_path + suffix).unlink(missing_ok=True)
    Path(backup.database_path).replace(config.database_path)
    assert get(client, "/stats", site_id="s")["total_views"] == 1


# -- the database out of reach -------------------------------------------------

@pytest.mark.embedded
@pytest.mark.parametrize("url", ["/stats?site_id=s", "/stats/timeseries?site_id=s",
                                 "/stats/breakdown?site_id=s&property=path"])
def test_reports_answer_503_not_500_when_the_database_cannot_be_opened(client, config, url):
    shutil.rmtree(config.data_dir)
    response = client.get(url)
    assert response.status_code == 503
    assert response.get_json() == {"error": "Database unavailable; retry later"}


@pytest.mark.embedded
@pytest.mark.parametrize("url", ["/stats?site_id=s", "/stats/timeseries?site_id=s",
                                 "/stats/breakdown?site_id=s&property=path"])
def test_reports_answer_503_not_500_when_the_database_file_is_not_a_database(client, config, url):
    Path(config.database_path).write_bytes(b"not a database" * 1000)
    response = client.get(url)
    assert response.status_code == 503
    assert response.get_json() == {"error": "Database unavailable; retry later"}


def test_only_sqlite_errors_that_mean_an_outage_become_503s_never_a_bug_in_a_statement():
    assert isinstance(unavailable_or_bug(sqlite3.OperationalError("database is locked"), "a.db"),
                      StoreUnavailable)
    assert isinstance(unavailable_or_bug(sqlite3.DatabaseError("file is not a database"), "a.db"),
                      StoreUnavailable)
    bug = sqlite3.ProgrammingError("Incorrect number of bindings supplied")
    assert unavailable_or_bug(bug, "a.db") is bug


@pytest.mark.parametrize("url", ["/stats?site_id=a%00", "/stats/timeseries?site_id=a%00",
                                 "/stats/breakdown?site_id=a%00&property=path"])
def test_site_id_with_a_nul_character_is_a_400(client, url):
    response = client.get(url)
    assert response.status_code == 400
    assert response.get_json() == {"error": "Invalid site_id: contains a NUL character"}
