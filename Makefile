# budgetflow developer commands. `make test` is what CI runs (.ci/run).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Helm, built from the Go module proxy at a pinned version into the user cache (tests/unit/test_helm_chart.py
# finds it there too), with the ldflags of Helm's own release build: its version, and as the default Kubernetes
# version the one of the client-go it is built with. A plain `go install` leaves Kubernetes v1.20, which the
# chart's kubeVersion (>= 1.25) refuses. The directory names the build, so a plain build left in a cache is not used.
HELM_VERSION := $(shell cat helm/HELM_VERSION)
HELM := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/budgetflow/tools/helm-$(HELM_VERSION)-release/helm
# The oldest Kubernetes the chart supports (kubeVersion in helm/budgetflow/Chart.yaml).
KUBE_MIN := 1.25

.PHONY: help setup kafka-jars faust-venv promtool lint format typecheck unit integration test run demo litellm bench soak chart clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

$(HELM):
	@command -v go >/dev/null || { echo "go is missing: Helm is built from the Go module proxy" >&2; exit 1; }
	mod=$$(go mod download -json helm.sh/helm/v3@$(HELM_VERSION) | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$$/\1/p'); \
	minor=$$(sed -n 's/^[[:space:]]*k8s.io\/client-go v0\.\([0-9][0-9]*\)\..*/\1/p' "$$mod"); \
	[ -n "$$minor" ] || { echo "no k8s.io/client-go version in $$mod" >&2; exit 1; }; \
	echo "helm $(HELM_VERSION): default Kubernetes v1.$$minor (its client-go)"; \
	GOBIN=$(dir $(HELM)) CGO_ENABLED=0 go install -trimpath -ldflags "-s -w \
	  -X helm.sh/helm/v3/internal/version.version=$(HELM_VERSION) -X helm.sh/helm/v3/internal/version.metadata= \
	  -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$$minor \
	  -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$$minor" \
	  helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)
	touch $(HELM)

# Everything the tests and `make chart` need. The demo, the benchmarks and `make run` need only the venv and the
# Kafka jars (no Helm, no promtool): they depend on $(STAMP) and kafka-jars, not on setup.
setup: $(STAMP) $(HELM) promtool kafka-jars faust-venv  ## create .venv with budgetflow and its dev tools, fetch the Kafka jars, build helm, install promtool, make the Faust bench's venv

kafka-jars: $(STAMP)  # the local broker's jars, fetched through Maven once and cached (streams/dev/kafkajars.py)
	$(BIN)/python -c 'from budgetflow.streams.dev.kafkajars import KafkaJars; from budgetflow.schemas import load_settings; print("kafka jars:", KafkaJars.from_settings(load_settings().local_kafka).ensure())'

# faust-streaming for `budgetflow bench --only faust` and its test, in a venv of its own in the user cache (it pins
# croniter<6, the LiteLLM proxy's constraints croniter 7): made once, by streams/dev/faust_worker.py.
faust-venv: $(STAMP)
	$(BIN)/python -m budgetflow.streams.dev.faust_worker

promtool:  # Debian's prometheus package: promtool and a Prometheus server for the tests
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's prometheus package (promtool and a Prometheus server for the tests)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool is missing: sudo apt-get install prometheus" >&2; exit 1; fi; }

.PHONY: .typecheck/budgetflow
.typecheck/budgetflow:  # a link per code folder, made each time (a folder added later gets its link)
	mkdir -p .typecheck/budgetflow
	for d in streams schemas tokenizers integrations; do ln -sfn ../../$$d .typecheck/budgetflow/$$d; done

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP) .typecheck/budgetflow  ## mypy --strict on the package
	$(BIN)/mypy 2>&1 | sed 's#^\.typecheck/budgetflow/##'

unit: $(STAMP)  ## unit tests only (no broker, seconds)
	$(BIN)/pytest tests/unit

integration: setup  ## integration tests (starts a real Kafka)
	$(BIN)/pytest tests/integration

test: setup lint typecheck chart  ## lint, types, the chart and the whole suite (what CI runs)
	$(BIN)/pytest

soak: setup  ## the soak test for ten minutes (CI runs it for 20 s)
	BUDGETFLOW_TEST_SOAK_S=600 BUDGETFLOW_TEST_SOAK_RATE=15000 $(BIN)/pytest tests/integration/test_soak.py -s

chart: $(HELM)  ## helm lint --strict and render the chart, for Helm's default Kubernetes and the oldest supported
	$(HELM) lint --strict helm/budgetflow
	$(HELM) lint --strict --kube-version $(KUBE_MIN) helm/budgetflow
	$(HELM) template budgetflow helm/budgetflow >/dev/null
	$(HELM) template budgetflow helm/budgetflow --kube-version $(KUBE_MIN) >/dev/null
	@echo "chart lints and renders (Helm's default Kubernetes and $(KUBE_MIN))"

bench: $(STAMP) kafka-jars  ## benchmarks beside their baselines; JSON in bench-results/
	$(BIN)/budgetflow bench --out bench-results/bench.json

demo: $(STAMP) kafka-jars  ## a month of LLM traffic through the real pipeline in about a minute, watched live
	$(BIN)/budgetflow demo

litellm: $(STAMP) kafka-jars  ## a LiteLLM proxy under budgetflow's budgets (mocked models), with Kafka and the workers (Ctrl-C stops them)
	$(BIN)/budgetflow litellm

run: $(STAMP) kafka-jars  ## start Kafka, create topics, apply examples/policies.yaml, run the workers (Ctrl-C stops them)
	$(BIN)/budgetflow kafka start
	$(BIN)/budgetflow topics create > /dev/null
	$(BIN)/budgetflow policy apply examples/policies.yaml
	$(BIN)/budgetflow worker --role all

clean:  ## remove the venv, caches and local data
	rm -rf $(VENV) .typecheck .mypy_cache .ruff_cache .pytest_cache .budgetflow build dist
