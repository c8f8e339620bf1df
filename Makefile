# make run    set up .venv, then run the API and the processor together (Ctrl-C stops both)
# make test   set up .venv, start PostgreSQL and Redis if they are down, install Chromium and
#             the npm trackers for the browser tests, PgBouncer and nginx for theirs, then run
#             the whole test suite
# make bench  set up .venv, then run the benchmarks and record bench/RESULTS.md, PROCESSOR.md, REPORTS.md
#             and SCALE.md (this one needs PostgreSQL and Redis, started as for the tests)
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test bench

$(VENV)/installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# the tests' and benchmarks' packages (a browser driver, DuckDB, ...) only where they run
$(VENV)/dev-installed: requirements-dev.txt $(VENV)/installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

run: $(VENV)/installed
	honcho start || test $$? -eq 130    # 130: stopped by a SIGINT (make, given Ctrl-C too, says Interrupt)

test: $(VENV)/dev-installed
	.ci/services
	.ci/provision-browser
	.ci/provision-pgbouncer
	.ci/provision-nginx
	python -m pytest

bench: $(VENV)/dev-installed
	python bench/run.py
	python bench/processor_bench.py
	python bench/reports_bench.py
	.ci/services
	python bench/scale_bench.py
