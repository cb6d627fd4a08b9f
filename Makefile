# memvisor: `make run` sets everything up and boots the demo sandbox; `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test deps image lint typecheck unit vm bench bench-boot bench-swap bench-density bench-memctl bench-image bench-park bench-template bench-scratch bench-fleet soak serve-soak soak-supervisor soak-crash soak-fleet clean

deps: $(STAMP)

$(STAMP): pyproject.toml scripts/install-host-deps
	./scripts/install-host-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

image: deps
	$(BIN)/memvisor image build

run: image
	$(BIN)/memvisor run --memory 256 -- sh -c 'echo "hello from $$(uname -n), kernel $$(uname -r), uid $$(id -u)"; \
		grep -E "MemTotal|Shmem:" /proc/meminfo; grep " /mnt/rootfs " /proc/mounts; \
		python3 -c "import sys, ssl, sqlite3, asyncio; print(\"python\", sys.version.split()[0], ssl.OPENSSL_VERSION)"'

lint: deps
	$(BIN)/ruff check memvisor tests bench

typecheck: deps
	$(BIN)/mypy

unit: deps
	$(BIN)/pytest -q -m "not vm"

vm: image
	$(BIN)/pytest -q -m vm

test: lint typecheck image
	$(BIN)/pytest -q

bench: bench-boot bench-swap

bench-boot: image
	$(BIN)/python bench/boot.py

bench-swap: image
	$(BIN)/python bench/swap.py

# How many idle-agent sandboxes fit in a 1.5 GiB memory cgroup: plain QEMU vs memvisor vs memvisor+KSM (root).
# Issue 20's parking figure: DENSITY_ARGS='--configs plain-bursty,parking' (sandboxes idle but for a short command).
bench-density: image
	$(BIN)/python -m bench.density $(DENSITY_ARGS)

# memctl: host ranges applied per second, end-to-end request latency in a guest (issue 10).
bench-memctl: image
	$(BIN)/python -m bench.memctl $(MEMCTL_ARGS)

# One shared read-only image vs a copy per guest: 1, 4 and 8 guests of the default and a ~200 MiB image (issue 13).
bench-image: image
	$(BIN)/python -m bench.image $(IMAGE_ARGS)

# Parking (issue 20): park time, snapshot size, host memory parked, resume vs cold start; 256 and 1024 MiB guests.
bench-park: image
	$(BIN)/python -m bench.park $(PARK_ARGS)

# The fleet (issue 27): park seconds per GiB into a shared store, resume on the same host vs another (a one-machine
# fleet: a real etcd, two daemons), E2B's published figures beside them.
bench-fleet: image
	$(BIN)/python -m bench.fleet $(FLEET_ARGS)

# The confidential scratch disk (issue 26): boot cost and throughput of plain vs confidential scratch, tag RAM.
bench-scratch: image
	$(BIN)/python -m bench.scratch $(SCRATCH_ARGS)

# Templates (issue 21): cold boot + warm-up vs a clone, start time and host memory for 1, 4 and 8 sandboxes.
bench-template: image
	$(BIN)/python -m bench.template $(TEMPLATE_ARGS)

# The daemon soak: `memvisor serve`, ten sandboxes, commands into any of them for an hour (issue 9).
serve-soak: image
	$(BIN)/python -m bench.serve_soak $(SERVE_SOAK_ARGS)

# The supervisor under load (issue 19's goal: 0 panics, 0 guest or host OOM kills in 5 runs of 10 minutes): the daemon
# in a 1.5 GiB memory cgroup, sandboxes added until admission refuses; about an hour under TCG; root.
soak-supervisor: image
	$(BIN)/python -m bench.supervisor_soak $(SOAK_SUPERVISOR_ARGS)

# The crash soak (issue 26's goal: 0 sandboxes silently gone in 20 kills): `memvisor serve` SIGKILLed at random
# instants with sandboxes mid-command, mid-park and mid-resume, a new daemon each time; ~10 minutes under TCG.
soak-crash: image
	$(BIN)/python -m bench.crash_soak $(SOAK_CRASH_ARGS)

# The fleet soak (issue 27): 4 sandboxes parked and resumed across 2 daemons of a one-machine fleet, all at once,
# claimed by both hosts at once, one daemon restarted every 5 rounds; 20 rounds; prints how many steps went wrong.
soak-fleet: image
	$(BIN)/python -m bench.fleet_soak $(SOAK_FLEET_ARGS)

# The swap soak (goals: 0 stalls in 100 confidential and 100 authenticated runs, 0 in 50 of each other mode), two
# sandboxes at a time; about 2.5 hours under TCG. SOAK_ARGS passes options, e.g. SOAK_ARGS="--runs confidential=20".
soak: image
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
