# mail-selfcheck: one image for the operator (`mail-selfcheck operator`) and the probe
# (`mail-selfcheck run`). Build: hack/build-image.sh (buildah, no Docker engine needed) or
#   docker build -t mail-selfcheck .
# Runs as a non-root numeric user with a read-only root filesystem: nothing is written at
# run time except the result file the probe is asked for (/dev/termination-log in a Job).

# Any Debian-like image with python3 >= 3.11 (`python3 -m venv` working). The tests
# substitute a local debootstrap bookworm base (Python 3.11); paths below never name the
# Python minor version.
ARG BASE_IMAGE=python:3.12-slim

# ---------------------------------------------------------------------------------------
# The [project] dependencies of pyproject.toml as a requirements file. Its own stage so that
# edits of pyproject.toml that leave the dependencies alone keep the dependency layer cached.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /pyproject.toml
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/pyproject.toml", "rb"))["project"]["dependencies"]))' > /requirements.txt

# ---------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder
# Optional, for builds behind a private index / TLS-intercepting proxy (build-time only;
# ARGs are not stored in the final image).
ARG PIP_INDEX_URL
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_CONSTRAINT=/src/constraints.txt \
    PYTHONDONTWRITEBYTECODE=1
# /opt/build: pip and the build backend, never leaves this stage.
# /opt/venv: the runtime environment, created without pip/setuptools; /opt/build's pip
# installs into it (pip --python).
RUN python3 -m venv /opt/build \
 && python3 -m venv --without-pip /opt/venv
WORKDIR /src
# Dependencies first (own layer, rebuilt only when the dependencies or their pins change),
# resolved to the exact versions in constraints.txt (which also pins the build backend used
# for the wheel below). Wheels only: no compiler needed.
COPY constraints.txt /src/
COPY --from=requirements /requirements.txt /src/
RUN /opt/build/bin/pip --python /opt/venv/bin/python install --only-binary=:all: -r /src/requirements.txt
# The project itself, built into a wheel (isolated build env pinned by PIP_CONSTRAINT).
COPY pyproject.toml README.md /src/
COPY operator /src/operator
RUN /opt/build/bin/pip wheel --no-deps --wheel-dir /tmp/wheels /src \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --no-deps --no-index /tmp/wheels/*.whl \
 && /opt/build/bin/pip --python /opt/venv/bin/python check \
 && /opt/venv/bin/mail-selfcheck --help >/dev/null

# ---------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="mail-selfcheck" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.opencontainers.image.description="Kubernetes operator and probe that prove a mail stack delivers mail (SMTP submission -> IMAP mailbox)" \
      org.opencontainers.image.licenses="Apache-2.0"
# Named non-root user with a fixed numeric id (runAsNonRoot needs a number): no home, no
# login shell. /etc/passwd entry so libraries that look the user up do not fail.
RUN echo 'selfcheck:x:65532:65532:mail-selfcheck:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'selfcheck:x:65532:' >> /etc/group
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/nonexistent
USER 65532:65532
WORKDIR /
ENTRYPOINT ["mail-selfcheck"]
CMD ["--help"]
