# Muster build and test targets. `make help` lists them.
GO        ?= go
BIN       ?= bin
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X main.version=$(VERSION)
# Agent provisioning defaults compiled into muster-agent (see docs/agent.md).
AGENT_BROKERS ?=
AGENT_TOKEN   ?=
AGENT_PROVISIONER_KEYS ?=
AGENT_CA      ?=
AGENT_CA_PIN  ?=
AGENT_FACTS   ?=
AGENT_PROVISION ?= true
AGENT_LDFLAGS := $(LDFLAGS) -X main.provisionBrokers=$(AGENT_BROKERS) -X main.provisionToken=$(AGENT_TOKEN) \
	-X main.provisionerKeys=$(AGENT_PROVISIONER_KEYS) \
	-X main.provisionCA=$(AGENT_CA) -X main.provisionCAPin=$(AGENT_CA_PIN) -X main.factsFile=$(AGENT_FACTS) \
	-X main.provisionDefault=$(AGENT_PROVISION)
FUZZTIME  ?= 5s

.PHONY: help build test lint fuzz fuzz-short bench faults demo clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# muster-helper (exec'd once per node) and muster-agent (started and re-exec'd on every
# machine) are static (CGO_ENABLED=0): no dynamic loader or libc dependency at each start.
build: ## build bin/muster, bin/muster-helper and bin/muster-agent (static; agent defaults from AGENT_* variables)
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/muster ./cmd/muster
	CGO_ENABLED=0 $(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/muster-helper ./cmd/muster-helper
	CGO_ENABLED=0 $(GO) build -ldflags "$(AGENT_LDFLAGS)" -o $(BIN)/muster-agent ./cmd/muster-agent

test: ## the whole suite: test deps, lint, race tests, short fuzzing (what CI runs)
	./scripts/test.sh

lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

fuzz-short: ## run every fuzz target briefly (FUZZTIME each, default 5s)
	./scripts/fuzz.sh $(FUZZTIME)

fuzz: ## run every fuzz target for longer (FUZZTIME=2m by default here)
	./scripts/fuzz.sh $(if $(filter 5s,$(FUZZTIME)),2m,$(FUZZTIME))

faults: ## the HA fault suite alone (docs/ha.md § Fault tests), verbose, failover figures in fault-report.txt
	MUSTER_FAULT_REPORT=$(CURDIR)/fault-report.txt $(GO) test -race -count=1 -v -run . ./internal/faulttest/

bench: ## go test benchmarks of the hot paths
	$(GO) test -run '^$$' -bench . -benchmem ./...

demo: ## provision 200 simulated nodes on embedded defaults
	$(GO) run ./cmd/muster demo --nodes 200

clean: ## remove build output
	rm -rf $(BIN)
