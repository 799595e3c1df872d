# Two commands set everything up on a fresh Debian machine: `make demo` and `make test`.
.PHONY: demo test bench bench-sbom lint

# OSV advisories for the demo's CVE scan, when the workspace's shared data is beside the checkout.
VULNDB := $(wildcard ../shared/data/osv-debian)

demo:
	scripts/bootstrap.sh
	.venv/bin/amiforge demo $(if $(VULNDB),--vulndb $(VULNDB))

test:
	scripts/bootstrap.sh --test
	scripts/test.sh

bench:
	scripts/bootstrap.sh
	.venv/bin/python bench/bake_bench.py
	.venv/bin/python bench/sbom_bench.py

bench-sbom:
	scripts/bootstrap.sh
	.venv/bin/python bench/sbom_bench.py

# Start-up time of --help and read-only commands, this tree against STARTUP_BEFORE (the commit before lazy imports).
STARTUP_BEFORE ?= bd7b136
.PHONY: bench-startup
bench-startup:
	scripts/bootstrap.sh
	.venv/bin/python bench/startup_bench.py --ref $(STARTUP_BEFORE)

# Store reads and read commands on a synthetic registry (100 images × 1,000 versions, 1,000,000 events): SQLite, and
# PostgreSQL too when AMIFORGE_TEST_POSTGRES_URL is set. REGISTRY_BENCH_ARGS: e.g. --images 10, --db PATH (reuse).
.PHONY: bench-registry
bench-registry:
	scripts/bootstrap.sh
	.venv/bin/python bench/registry_bench.py $(REGISTRY_BENCH_ARGS)

# Vulnerability data (synthetic, at the published sizes): importing osv's Debian all.zip, the Debian tracker's JSON and
# 300,000 NVD CVEs, and rescan of 100 versions × 1,000 packages against its 5 s target (profiled when it misses).
# VULNDB_BENCH_ARGS: e.g. --scale 0.1, --data DIR (keep and reuse the generated files), --rescan-budget 0 (no limit).
.PHONY: bench-vulndb
bench-vulndb:
	scripts/bootstrap.sh
	.venv/bin/python bench/vulndb_bench.py $(VULNDB_BENCH_ARGS)

# /metrics of `amiforge serve` on 1,000 versions, 100 fleets, 1,000,000 boots. TELEMETRY_BENCH_ARGS: e.g. --db PATH.
.PHONY: bench-telemetry
bench-telemetry:
	scripts/bootstrap.sh
	.venv/bin/python bench/telemetry_bench.py $(TELEMETRY_BENCH_ARGS)

# The web console: catalog and version pages on 10,000 versions and 1,000,000 events (p95 ≤ 150 ms), and a live
# rollout page's delay after a decision (≤ 2 s). WEB_BENCH_ARGS: e.g. --db PATH (reuse), --runs 50.
.PHONY: bench-web
bench-web:
	scripts/bootstrap.sh
	.venv/bin/python bench/web_bench.py $(WEB_BENCH_ARGS)

# Retirement: plan and apply on 10,000 images in 4 regions of a fake EC2 with its token buckets (plan ≤ 2 s CPU,
# apply ≤ 1.1 × the buckets' floor, DescribeImages ≤ ⌈N/1000⌉ per region), and 1,000 of the oracle's random worlds.
# RETIRE_BENCH_ARGS: e.g. --worlds 0, --versions 20.
.PHONY: bench-retire
bench-retire:
	scripts/bootstrap.sh --test
	.venv/bin/python bench/retire_bench.py $(RETIRE_BENCH_ARGS)

lint:
	.venv/bin/ruff format src tests bench
	.venv/bin/ruff check --fix src tests bench
	.venv/bin/mypy src
	.venv/bin/mypy tests
	.venv/bin/lint-imports
