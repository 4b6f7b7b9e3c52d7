# fedgate: the two commands a newcomer needs are `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test testdeps resilience soak bench lint venv clean sbom wheel reproducible

# The virtualenv only: no root, no system packages (`make demo` needs nothing else).
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

# What only the tests need: redis-server and rsyslogd (with its gtls driver), installed
# with apt-get when missing (the tests start their own on free loopback ports), and
# SoftHSM2 (the PKCS#11 signer's tests make their own tokens in temporary directories).
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
	@command -v softhsm2-util >/dev/null 2>&1 || { \
	  echo "softhsm2-util not found: installing softhsm2 (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2) >/dev/null || \
	  { echo "error: softhsm2 is required for the PKCS#11 tests (apt-get install softhsm2)" >&2; exit 1; }; }

venv: $(STAMP)

# Two pytest workers, one test file per worker at a time (pytest-xdist --dist loadfile):
# the suite is mostly waiting on real servers and processes; serial, it neared CI's 15 min.
test: testdeps $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# docs/RESILIENCE.md: the SIEM shipper's 30 s receiver outage (`make test` runs a 3 s one),
# 100,000 hostile inputs through the server (`make test`: 2,000), kill -9 under load 40
# times per store (`make test`: 5), the Redis Cluster failover and slot move under load
# (docs/SCALING.md), a coverage-guided fuzz of the canonical parser, the 10-minute soak.
resilience: testdeps $(STAMP)
	FEDGATE_RESILIENCE=1 $(BIN)/python -m pytest -q -s -m resilience \
	  tests/integration/test_audit_shipper.py tests/integration/test_fuzz_server.py \
	  tests/integration/test_audit_outbox.py tests/integration/test_cluster_faults.py
	cd "$$(mktemp -d)" && $(abspath $(BIN))/python $(CURDIR)/bench/fuzz_canonical.py \
	  -runs=2000000 -max_len=4096
	$(BIN)/python bench/soak.py

# Ten minutes at half the measured maximum rate, Redis, two workers (docs/RESILIENCE.md).
soak: testdeps $(STAMP)
	$(BIN)/python bench/soak.py

demo: $(STAMP)
	$(BIN)/fedgate demo

bench: $(STAMP)
	$(BIN)/python bench/pipeline_bench.py --write docs/BENCHMARKS.md
	$(BIN)/python bench/http_bench.py --append docs/BENCHMARKS.md
	$(BIN)/python bench/baseline_bench.py --append docs/BENCHMARKS.md
	$(BIN)/python bench/latency_bench.py --append docs/BENCHMARKS.md
	$(BIN)/python bench/sign_bench.py --append docs/BENCHMARKS.md
	$(BIN)/python bench/feedback_query_bench.py --executions 100 --append docs/BENCHMARKS.md
	$(BIN)/python bench/feedback_query_bench.py --executions 1000 --append docs/BENCHMARKS.md

# CycloneDX JSON SBOM of the venv's installed dependency set (tools/sbom.py: the
# generator, PyPI cyclonedx-bom, runs from its own .venv-sbom, made on first use).
sbom: $(STAMP)
	$(BIN)/python tools/sbom.py generate dist/fedgate.cdx.json --python $(BIN)/python

# The wheel, dated by the last commit (SOURCE_DATE_EPOCH), with the SBOM inside its
# .dist-info/sboms/ (PEP 770).
wheel: sbom
	rm -f dist/fedgate-*.whl
	SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct) $(BIN)/python -m pip wheel --no-deps -q -w dist .
	$(BIN)/python tools/sbom.py attach dist/fedgate-*.whl dist/fedgate.cdx.json

# Two wheels from two fresh clones of the last commit must be byte-identical.
reproducible: $(STAMP)
	$(BIN)/python tools/reproducible_wheel.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .venv-sbom build dist *.egg-info .pytest_cache .hypothesis
