# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS_DIR ?= models
PEERS := .venv-peers
KSERVE := .venv-kserve

.PHONY: install models serve test bench bench-peers chaos cluster cluster-stop clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

models: $(STAMP)
	$(BIN)/mlserve models --models-dir $(MODELS_DIR)

serve: models
	$(BIN)/mlserve serve --models-dir $(MODELS_DIR)

# Redis, three replicas and HAProxy on loopback (Debian's redis-server and haproxy): see README, "Deploy".
cluster: models
	$(BIN)/python deploy/cluster/cluster.py up --models-dir $(MODELS_DIR)

cluster-stop:
	$(BIN)/python deploy/cluster/cluster.py down

test: $(STAMP) $(KSERVE)/.installed
	$(BIN)/python -m pytest

# The KServe SDK in a venv of its own (it pins pandas and protobuf below ours), for tests/kserve_types.py.
$(KSERVE)/.installed:
	test -x $(KSERVE)/bin/python || $(PYTHON) -m venv $(KSERVE)
	$(KSERVE)/bin/python -m pip install --quiet kserve==0.21.0 kubernetes==37.0.1
	touch $@

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# Overload, worker kills, Redis faults, idle and slowloris connections, SIGTERM: the full chaos suite and
# its report (a short form of it runs in `make test`, tests/test_chaos.py).
chaos: $(STAMP)
	$(BIN)/python -m benchmarks.chaos --out-dir benchmarks/results/chaos

# MLServer 1.7.1 in a venv of its own, with our scikit-learn so it unpickles the same models.
$(PEERS)/.installed: $(STAMP)
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet mlserver==1.7.1 mlserver-sklearn==1.7.1 uvloop==0.21.0 \
		scikit-learn==$$($(BIN)/python -c 'import sklearn; print(sklearn.__version__)')
	touch $@

bench-peers: $(PEERS)/.installed
	$(BIN)/python -m benchmarks --peers --out-dir benchmarks/results/peers

clean:
	rm -rf $(VENV) $(PEERS) $(KSERVE) build *.egg-info
