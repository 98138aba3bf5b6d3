# mail-selfcheck developer entry points. See README.md.
PY   ?= python3
VENV := .venv
BIN  := $(VENV)/bin

.PHONY: test demo system-deps venv control-plane servers gatus node

## Debian packages the tests need (Postfix, Dovecot, buildah, ...); idempotent.
system-deps:
	bash hack/install-system-deps.sh

## Python virtualenv with the project and its test dependencies.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

## Build (or find in ~/.cache/mail-selfcheck) etcd, kube-apiserver, kube-controller-manager, kubectl, helm.
control-plane: venv
	$(BIN)/python -m tests.harness.controlplane build

## IMAP servers of the server-matrix tier (Cyrus/Courier unpacked from Debian 12 .debs, GreenMail jar),
## cached in ~/.cache/mail-selfcheck/servers.
servers:
	bash hack/install-servers.sh

## Gatus (a real heartbeat receiver for the heartbeat tests), built from the Go module proxy,
## cached in ~/.cache/mail-selfcheck/gatus-*.
gatus: venv
	$(BIN)/python -m tests.harness.gatus build

## Build (or find) the real node: kubelet v1.35.4, kube-scheduler, pause + app images (root).
node: system-deps venv control-plane
	$(BIN)/python -m tests.harness.node build

## The whole test suite: unit, real Postfix+Dovecot (+ Cyrus, Courier, GreenMail), real Kubernetes
## control plane, and a real node (kubelet + containerd) for the chart's Deployment and the probe Jobs.
test: system-deps venv control-plane servers gatus node
	$(BIN)/pytest

## One-command demo: control plane + a real node (kubelet + containerd) + mail stack + the chart's
## operator pod + a sample MailSelfcheck whose probe Job pods run on the node. Builds (or finds) the
## node and the image first. ARGS="--once" stops after the first result; ARGS="--keep" keeps logs.
demo: system-deps venv control-plane
	$(BIN)/python -m tests.harness.demo $(ARGS)
