# Local development stack (see `embedjob dev --help`). Everything runs as processes on 127.0.0.1;
# state and logs live in .dev/. The first `dev-up` on a fresh machine builds kube-apiserver (8-10 min).
PY ?= .venv/bin/python
WORKERS ?= 1

.PHONY: dev-up dev-down dev-status test-operator test-e2e

dev-up:
	$(PY) -m embedjob.cli dev up --workers $(WORKERS)

dev-down:
	$(PY) -m embedjob.cli dev down

dev-status:
	$(PY) -m embedjob.cli dev status

test-operator:
	$(PY) -m pytest -q tests/test_operator_status.py tests/test_operator_reconcile.py

test-e2e:
	$(PY) -m pytest -q -m e2e tests/e2e
