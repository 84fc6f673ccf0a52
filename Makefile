# Local development stack (see `embedjob dev --help` and docs/operations.md). Everything runs as
# processes on 127.0.0.1; state and logs live in .dev/. `dev up` needs the kube-apiserver that
# scripts/setup.sh builds once (8-10 min) into ~/.cache/embedjob.
BIN ?= .venv/bin
WORKERS ?= 1

.PHONY: dev-up dev-down dev-status test-operator test-e2e

dev-up:
	$(BIN)/embedjob dev up --workers $(WORKERS)

dev-down:
	$(BIN)/embedjob dev down

dev-status:
	$(BIN)/embedjob dev status

test-operator:
	$(BIN)/pytest -q tests/operator tests/test_operator_crd.py tests/test_progress.py

test-e2e:
	$(BIN)/pytest -q -m e2e tests/e2e
