# fedgate: the two commands a newcomer needs are `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test testdeps resilience bench lint venv clean

# The virtualenv only: no root, no system packages (`make demo` needs nothing else).
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

# What only the tests need: redis-server and rsyslogd (with its gtls driver), installed
# with apt-get when missing (the tests start their own on free loopback ports).
testdeps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server not found: installing (apt-get)"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null || \
	  { echo "error: redis-server is required for the tests (apt-get install redis-server)" >&2; exit 1; }; }
	@{ command -v rsyslogd >/dev/null 2>&1 && \
	   find /usr/lib -path '*rsyslog/lmnsd_gtls.so' 2>/dev/null | grep -q .; } || { \
	  echo "rsyslogd (with gtls) not found: installing rsyslog rsyslog-gnutls (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsyslog rsyslog-gnutls) >/dev/null || \
	  { echo "error: rsyslog and rsyslog-gnutls are required for the tests (apt-get install rsyslog rsyslog-gnutls)" >&2; exit 1; }; }

venv: $(STAMP)

test: testdeps $(STAMP)
	$(BIN)/python -m pytest -q

# The SIEM shipper's 30 s receiver outage (docs/RESILIENCE.md); `make test` runs a 3 s one.
resilience: testdeps $(STAMP)
	FEDGATE_RESILIENCE=1 $(BIN)/python -m pytest -q -s -m resilience tests/integration/test_audit_shipper.py

demo: $(STAMP)
	$(BIN)/fedgate demo

bench: $(STAMP)
	$(BIN)/python bench/pipeline_bench.py --write docs/BENCHMARKS.md
	$(BIN)/python bench/http_bench.py --append docs/BENCHMARKS.md

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
