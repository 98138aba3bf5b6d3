"""A real, local Kubernetes control plane built from Go modules (issue 3).

This module is the one place that knows how to *build* and *run* the control plane used
by the ``cluster`` test tier and by the local demo. Nothing here is a mock: the binaries
are the upstream etcd, kube-apiserver, kube-controller-manager, kubectl and helm, compiled
from their published Go modules with ``go build``.

Build (``python -m tests.harness.controlplane build``)
    * ``k8s.io/kubernetes`` cannot be ``go install``-ed: its ``go.mod`` replaces every
      staging module (``k8s.io/api``, ``k8s.io/client-go``, ...) with a ``./staging/...``
      directory. We therefore generate a throw-away *wrapper module* that requires
      ``k8s.io/kubernetes@K8S_VERSION`` and replaces each staging module with its published
      ``v0.<minor>.<patch>`` release. The list of staging modules is **derived** from the
      upstream ``go.mod`` (``go mod download -json k8s.io/kubernetes@VERSION``), never
      hard-coded. The version is stamped with ``-ldflags -X
      k8s.io/component-base/version.gitVersion=...`` (and gitMajor, gitMinor, gitCommit,
      gitTreeState, buildDate; the same for ``k8s.io/client-go/pkg/version``), exactly as
      upstream's ``hack/lib/version.sh`` does, so ``/version``, kubectl and helm see it.
    * etcd: a tiny wrapper ``main`` calling ``go.etcd.io/etcd/server/v3/etcdmain.Main``.
    * helm: ``go install helm.sh/helm/v4/cmd/helm@HELM_VERSION`` with its version stamped.
    * Binaries land in ``$MAIL_SELFCHECK_CACHE`` (default ``~/.cache/mail-selfcheck``) in
      one directory per component and version: ``k8s-v1.36.3/``, ``etcd-v3.6.8/``,
      ``helm-v4.3.1/``. A directory is only used when its ``BUILDINFO.json`` exists (written
      last), so an interrupted build is simply redone; a second call builds nothing.
      Builds are serialised with an ``fcntl`` lock. ``CGO_ENABLED=0``, ``-trimpath``.

Run (``up`` / ``down`` / ``env``)
    :class:`ControlPlane` starts, on 127.0.0.1 and free ports:

    * etcd with its data in a temporary directory (``--unsafe-no-fsync``: test data only);
    * kube-apiserver with client-certificate authentication (a throw-away CA made with the
      ``openssl`` CLI), ``--authorization-mode=Node,RBAC``, a service-account signing key and
      issuer, ``--endpoint-reconciler-type=none``;
    * kube-controller-manager with every default controller (job, garbagecollector,
      ttl-after-finished, serviceaccount, serviceaccount-token, namespace, ...), signing
      service-account tokens with the same key, with its API rate limit and Job/GC worker
      counts raised for the tests and the scale benchmark (:data:`KCM_THROUGHPUT_FLAGS`,
      which says why);

    then waits for ``/readyz`` and for the ``default`` service account, and writes an admin
    kubeconfig. Every process's PID is recorded in ``state.json`` in the run directory;
    :meth:`ControlPlane.stop` (and ``down``) terminates them by PID (SIGTERM, then SIGKILL).
    The kubelet is replaced by :mod:`tests.harness.nodeagent` (see there); the ``node`` tier
    adds kube-scheduler and a real kubelet + containerd instead (:mod:`tests.harness.node`,
    with ``node_agent=False``).

CLI::

    python -m tests.harness.controlplane build   # build or find the pinned binaries
    python -m tests.harness.controlplane up      # start; prints `export KUBECONFIG=...`
    python -m tests.harness.controlplane env     # prints the export lines again
    python -m tests.harness.controlplane down    # stop everything started by `up`

Environment knobs: ``MAIL_SELFCHECK_CACHE`` (binary cache root),
``MAIL_SELFCHECK_RUN_DIR`` (where ``up`` keeps its state; default
``$MAIL_SELFCHECK_CACHE/run``), ``GO`` (the go binary; default ``go`` on PATH or
``/usr/local/go/bin/go``).

Errors: build failures raise :class:`BuildError` with the failing command and the tail of
its output; start failures raise :class:`ControlPlaneError` with the tail of the failing
component's log. Both are ``RuntimeError`` subclasses.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

# --------------------------------------------------------------------------- pins
#: Kubernetes release for kube-apiserver, kube-controller-manager and kubectl.
K8S_VERSION = os.environ.get("MAIL_SELFCHECK_K8S_VERSION", "v1.36.3")
#: etcd server release (the etcd client line Kubernetes v1.36 itself requires).
ETCD_VERSION = os.environ.get("MAIL_SELFCHECK_ETCD_VERSION", "v3.6.8")
#: Helm release (v4 major).
HELM_VERSION = os.environ.get("MAIL_SELFCHECK_HELM_VERSION", "v4.3.1")

K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kubectl")

#: kube-controller-manager throughput flags, raised above the upstream defaults for the
#: tests and the scale benchmark (``benchmarks/operator_scale.py``), not for realism.
#: Measured (issue 4 benchmark, N=300 MailSelfchecks every 60 s = 5 Jobs/s): with the
#: defaults ``--kube-api-qps=20 --kube-api-burst=30`` the Job controller is the first
#: component to saturate: its workqueue held ~280-500 Jobs, the controller-manager's requests
#: were capped at ~20-30/s and each waited ~0.2-0.3 s in the client-side rate limiter
#: (``rest_client_rate_limiter_duration_seconds``), while kube-apiserver used ~25 % of a
#: core and etcd ~5 %; slots were held back by Forbid (900 Jobs instead of 1,200). The
#: controller-manager makes ~9 API requests per Job (pod create, Job status updates, pod
#: finalizer removal, Events, the garbage collector deleting pruned Jobs' pods): at 1,000
#: resources (17 Jobs/s) it sent ~150 requests/s, unthrottled with these values. A real
#: cluster running many MailSelfchecks needs the same tuning of its controller-manager
#: (``--kube-api-qps``/``--kube-api-burst``; ``--concurrent-job-syncs``, default 5).
#: ``--concurrent-gc-syncs`` (default 20) is the garbage collector's. The API server's own
#: limits (``--max-requests-inflight=400``, ``--max-mutating-requests-inflight=200``, API
#: Priority and Fairness) were never reached at N=1,000 (at most ~250 requests in flight,
#: none queued by APF), so they keep their defaults.
KCM_THROUGHPUT_FLAGS = ("--kube-api-qps=300", "--kube-api-burst=600",
                        "--concurrent-job-syncs=20", "--concurrent-gc-syncs=20")


class BuildError(RuntimeError):
    """A ``go`` command failed while building a component."""


class ControlPlaneError(RuntimeError):
    """A control-plane component failed to start or to become ready."""


class CommandError(subprocess.CalledProcessError):
    """kubectl/helm failed; ``str()`` includes the command's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {(self.stderr or '').strip()[-2000:]}"


def cache_root() -> Path:
    """Root of the binary cache (``$MAIL_SELFCHECK_CACHE`` or ``~/.cache/mail-selfcheck``)."""
    env = os.environ.get("MAIL_SELFCHECK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mail-selfcheck"


def _log(msg: str) -> None:
    print(f"[controlplane] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- build
def _go_binary() -> str:
    env = os.environ.get("GO")
    if env:
        return env
    found = shutil.which("go")
    if found:
        return found
    if Path("/usr/local/go/bin/go").exists():
        return "/usr/local/go/bin/go"
    raise BuildError("no `go` toolchain found (set $GO or put go on PATH)")


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CGO_ENABLED="0", GOFLAGS="-buildvcs=false", GOWORK="off")
    env.setdefault("GOTOOLCHAIN", "local")
    return env


def _run_go(args: list[str], cwd: Path, log: Path, extra_env: dict[str, str] | None = None
            ) -> str:
    """Run ``go ARGS`` in ``cwd``, appending its output to ``log``; return stdout."""
    cmd = [_go_binary(), *args]
    _log(f"$ (cd {cwd} && {' '.join(cmd)})")
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=cwd, env={**_go_env(), **(extra_env or {})},
                              stdout=subprocess.PIPE,
                              stderr=fh, text=True)
        fh.write(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise BuildError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                         f"in {cwd}; log {log}; tail:\n{tail}")
    return proc.stdout


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_built(dest: Path, names: tuple[str, ...]) -> bool:
    return (dest / "BUILDINFO.json").is_file() and all(
        os.access(dest / n, os.X_OK) for n in names)


def _module_info(module: str, version: str, work: Path, log: Path) -> dict:
    """``go mod download -json MODULE@VERSION`` (fetches the zip into GOMODCACHE)."""
    out = _run_go(["mod", "download", "-json", f"{module}@{version}"], work, log)
    info = json.loads(out)
    if info.get("Error"):
        raise BuildError(f"go mod download {module}@{version}: {info['Error']}")
    return info


_REPLACE_RE = re.compile(r"^\s*(?:replace\s+)?(k8s\.io/[A-Za-z0-9._/-]+)\s*=>\s*\./staging/")


def staging_modules(upstream_gomod: str) -> list[str]:
    """Module paths that upstream ``k8s.io/kubernetes``'s go.mod replaces with ``./staging/...``.

    Handles both the ``replace ( ... )`` block form and single ``replace a => b`` lines.
    """
    mods: list[str] = []
    in_block = False
    for line in upstream_gomod.splitlines():
        stripped = line.split("//", 1)[0].strip()
        if stripped.startswith("replace ("):
            in_block = True
            continue
        if in_block and stripped == ")":
            in_block = False
            continue
        if in_block or stripped.startswith("replace "):
            m = _REPLACE_RE.match(stripped)
            if m:
                mods.append(m.group(1))
    return sorted(set(mods))


def _gomod_directive(gomod: str, name: str) -> list[str]:
    return [ln.strip() for ln in gomod.splitlines() if ln.strip().startswith(name + " ")]


def _stamp_time(info_file: str) -> str:
    try:
        t = json.loads(Path(info_file).read_text()).get("Time")
    except (OSError, ValueError):
        t = None
    return t or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _origin_hash(info_file: str) -> str:
    try:
        return json.loads(Path(info_file).read_text()).get("Origin", {}).get("Hash", "") or ""
    except (OSError, ValueError):
        return ""


def _fresh_workdir(name: str) -> Path:
    work = cache_root() / "build" / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def _finish(tmp_dest: Path, dest: Path, meta: dict) -> None:
    (tmp_dest / "BUILDINFO.json").write_text(json.dumps(meta, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp_dest.rename(dest)


def build_kubernetes(version: str = K8S_VERSION, binaries: tuple[str, ...] = K8S_BINARIES,
                     dest_name: str | None = None) -> Path:
    """Build ``binaries`` (default kube-apiserver, kube-controller-manager and kubectl) of
    ``k8s.io/kubernetes@version`` into ``$cache/<dest_name>`` (default ``k8s-<version>``);
    return that directory. The node harness (:mod:`tests.harness.node`) builds the kubelet
    and kube-scheduler with it."""
    dest = cache_root() / (dest_name or f"k8s-{version}")
    if _is_built(dest, binaries):
        return dest
    m = re.fullmatch(r"v1\.(\d+)\.(\d+)", version)
    if not m:
        raise BuildError(f"unsupported Kubernetes version {version!r} (want v1.MINOR.PATCH)")
    minor = m.group(1)
    staging_version = f"v0.{m.group(1)}.{m.group(2)}"
    t0 = time.monotonic()
    work = _fresh_workdir(dest_name or f"k8s-{version}")
    log = work / "build.log"
    (work / "go.mod").write_text("module mail-selfcheck.local/probe\n\ngo 1.21\n")
    info = _module_info("k8s.io/kubernetes", version, work, log)
    upstream = Path(info["GoMod"]).read_text()
    mods = staging_modules(upstream)
    if not mods:
        raise BuildError(f"found no ./staging replace directives in {info['GoMod']}")
    _log(f"k8s.io/kubernetes {version}: {len(mods)} staging modules -> {staging_version}")
    lines = ["// Generated by tests/harness/controlplane.py; not committed.",
             "module mail-selfcheck.local/k8s-build", ""]
    lines += _gomod_directive(upstream, "go") + _gomod_directive(upstream, "godebug") + [""]
    lines += [f"require k8s.io/kubernetes {version}", ""]
    lines += ["tool ("] + [f"\tk8s.io/kubernetes/cmd/{b}" for b in binaries] + [")", ""]
    lines += ["replace ("] + [f"\t{mod} => {mod} {staging_version}" for mod in mods] + [")", ""]
    (work / "go.mod").write_text("\n".join(lines))
    _run_go(["mod", "tidy"], work, log)
    build_date = _stamp_time(info["Info"])
    commit = _origin_hash(info["Info"])
    x = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        for key, val in (("gitVersion", version), ("gitMajor", "1"), ("gitMinor", minor),
                         ("gitCommit", commit), ("gitTreeState", "clean"),
                         ("buildDate", build_date)):
            x.append(f"-X {pkg}.{key}={val}")
    out = work / "bin"
    out.mkdir()
    _run_go(["build", "-trimpath", "-ldflags", " ".join(["-s", "-w", *x]), "-o", str(out) + "/",
             *[f"k8s.io/kubernetes/cmd/{b}" for b in binaries]], work, log)
    _finish(out, dest, {"component": "kubernetes", "version": version,
                        "binaries": list(binaries),
                        "staging_version": staging_version, "staging_modules": mods,
                        "gitCommit": commit, "buildDate": build_date,
                        "go": _run_go(["env", "GOVERSION"], work, log).strip(),
                        "seconds": round(time.monotonic() - t0, 1)})
    shutil.rmtree(work, ignore_errors=True)
    return dest


_ETCD_MAIN = """\
// Generated by tests/harness/controlplane.py: the etcd server, as etcd's own main does.
package main

import (
\t"os"

\t"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
"""


def build_etcd(version: str = ETCD_VERSION) -> Path:
    """Build the etcd server through a wrapper main around ``etcdmain``; return its dir."""
    dest = cache_root() / f"etcd-{version}"
    if _is_built(dest, ("etcd",)):
        return dest
    t0 = time.monotonic()
    work = _fresh_workdir(f"etcd-{version}")
    log = work / "build.log"
    (work / "go.mod").write_text(
        "// Generated by tests/harness/controlplane.py; not committed.\n"
        f"module mail-selfcheck.local/etcd-build\n\ngo 1.24\n\n"
        f"require go.etcd.io/etcd/server/v3 {version}\n")
    (work / "main.go").write_text(_ETCD_MAIN)
    _run_go(["mod", "tidy"], work, log)
    out = work / "bin"
    out.mkdir()
    _run_go(["build", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "etcd"), "."], work, log)
    _finish(out, dest, {"component": "etcd", "version": version,
                        "seconds": round(time.monotonic() - t0, 1)})
    shutil.rmtree(work, ignore_errors=True)
    return dest


def build_helm(version: str = HELM_VERSION) -> Path:
    """``go install helm.sh/helm/vN/cmd/helm@VERSION`` with its version stamped."""
    dest = cache_root() / f"helm-{version}"
    if _is_built(dest, ("helm",)):
        return dest
    major = version.split(".", 1)[0]  # "v4"
    mod = f"helm.sh/helm/{major}"
    t0 = time.monotonic()
    work = _fresh_workdir(f"helm-{version}")
    log = work / "build.log"
    (work / "go.mod").write_text("module mail-selfcheck.local/probe\n\ngo 1.21\n")
    info = _module_info(mod, version, work, log)
    commit = _origin_hash(info["Info"])
    x = [f"-X {mod}/internal/version.version={version}",
         f"-X {mod}/internal/version.gitCommit={commit}",
         f"-X {mod}/internal/version.gitTreeState=clean"]
    out = work / "bin"
    out.mkdir()
    _run_go(["install", "-trimpath", "-ldflags", " ".join(["-s", "-w", *x]),
             f"{mod}/cmd/helm@{version}"], work, log, extra_env={"GOBIN": str(out)})
    _finish(out, dest, {"component": "helm", "version": version, "gitCommit": commit,
                        "seconds": round(time.monotonic() - t0, 1)})
    shutil.rmtree(work, ignore_errors=True)
    return dest


@dataclass(frozen=True)
class Binaries:
    """Paths of the built binaries."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path
    helm: Path
    k8s_version: str = K8S_VERSION


def find_binaries() -> Binaries | None:
    """The cached binaries for the pinned versions, or ``None`` if any is missing."""
    root = cache_root()
    k8s, etcd, helm = (root / f"k8s-{K8S_VERSION}", root / f"etcd-{ETCD_VERSION}",
                       root / f"helm-{HELM_VERSION}")
    if not (_is_built(k8s, K8S_BINARIES) and _is_built(etcd, ("etcd",))
            and _is_built(helm, ("helm",))):
        return None
    return Binaries(etcd=etcd / "etcd", kube_apiserver=k8s / "kube-apiserver",
                    kube_controller_manager=k8s / "kube-controller-manager",
                    kubectl=k8s / "kubectl", helm=helm / "helm")


def build_all() -> Binaries:
    """Build (or find in the cache) every pinned binary. Raises :class:`BuildError`."""
    with _build_lock():
        found = find_binaries()
        if found:
            _log(f"binaries found in {cache_root()} (nothing to build)")
            return found
        t0 = time.monotonic()
        build_kubernetes()
        build_etcd()
        build_helm()
        _log(f"build finished in {time.monotonic() - t0:.0f}s")
    found = find_binaries()
    assert found is not None
    return found


# --------------------------------------------------------------------------- run
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def make_pki(pki: Path) -> None:
    """A throw-away CA, an apiserver serving cert and client certs, plus the SA key pair.

    Files: ca.{crt,key}, apiserver.{crt,key} (SAN 127.0.0.1, localhost, kubernetes...),
    admin.{crt,key} (CN=kubernetes-admin, O=system:masters),
    apiserver-kubelet-client.{crt,key} (O=system:masters; the API server towards kubelets),
    kube-controller-manager.{crt,key} (CN=system:kube-controller-manager),
    sa.{key,pub} (RSA 2048, signs service-account tokens).
    """
    if shutil.which("openssl") is None:
        raise ControlPlaneError("the `openssl` CLI is required (apt-get install openssl)")
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.crt", "-days", "30", "-subj", "/CN=mail-selfcheck-test-ca", cwd=pki)
    # IP:10.96.0.1: the `kubernetes` Service (first address of --service-cluster-ip-range),
    # the address pods of the real node (tests/harness/node.py) dial.
    sans = ("subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
            "DNS:kubernetes.default.svc.cluster.local")
    certs = {"apiserver": ("/CN=kube-apiserver", sans, "serverAuth"),
             "admin": ("/O=system:masters/CN=kubernetes-admin", None, "clientAuth"),
             # the API server's client certificate towards kubelets (logs, exec)
             "apiserver-kubelet-client": ("/O=system:masters/CN=kube-apiserver-kubelet-client",
                                          None, "clientAuth"),
             "kube-controller-manager": ("/CN=system:kube-controller-manager", None,
                                         "clientAuth")}
    for name, (subj, san, usage) in certs.items():
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", subj, cwd=pki)
        ext = pki / f"{name}.ext"
        ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                       f"extendedKeyUsage={usage}\n" + (san + "\n" if san else ""))
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "30",
                 "-extfile", ext.name, cwd=pki)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    for f in pki.glob("*.key"):
        f.chmod(0o600)


def write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> Path:
    """A kubeconfig (YAML is a JSON superset, so JSON is written) for ``user``'s cert."""
    cfg = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "mail-selfcheck", "cluster": {
            "server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": user, "user": {
            "client-certificate": str(pki / f"{user}.crt"),
            "client-key": str(pki / f"{user}.key")}}],
        "contexts": [{"name": "mail-selfcheck", "context": {
            "cluster": "mail-selfcheck", "user": user, "namespace": "default"}}],
        "current-context": "mail-selfcheck",
    }
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    path.chmod(0o600)
    return path


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    import ctypes
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pid_alive(pid: int, exe: str | None = None) -> bool:
    """True if ``pid`` runs and (when given) its command line mentions ``exe``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return exe is None or exe.encode() in cmdline


def terminate(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a child process: SIGTERM, then SIGKILL after ``timeout`` seconds; reaps it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_pid(pid: int, exe: str | None = None, timeout: float = 10.0) -> None:
    """SIGTERM ``pid`` (only if it is still ``exe``), SIGKILL after ``timeout`` seconds."""
    if not _pid_alive(pid, exe):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager (+ the node agent) on loopback.

    Attributes after :meth:`start`: ``kubeconfig`` (admin kubeconfig path), ``server``
    (``https://127.0.0.1:PORT``), ``version`` (the pinned ``v1.X.Y``), ``kubectl_bin``,
    ``helm_bin``, ``run_dir`` (logs: ``<component>.log``; state: ``state.json``).

    ``detach=True`` (the CLI's ``up``) lets the processes outlive this Python process;
    otherwise they receive SIGKILL if it dies (``PR_SET_PDEATHSIG``), and :meth:`stop`
    (also called by ``with``) ends them. Raises :class:`ControlPlaneError` on start failure,
    after stopping whatever had started.
    """

    binaries: Binaries
    run_dir: Path
    detach: bool = False
    node_agent: bool = True
    start_timeout: float = 120.0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    pids: dict[str, tuple[int, str]] = field(default_factory=dict)
    kubeconfig: Path | None = None
    server: str = ""

    @property
    def version(self) -> str:
        return self.binaries.k8s_version

    @property
    def kubectl_bin(self) -> Path:
        return self.binaries.kubectl

    @property
    def helm_bin(self) -> Path:
        return self.binaries.helm

    # ----------------------------------------------------------------- processes
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        logf = open(self.run_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            cwd=self.run_dir, env=env, start_new_session=True,
            preexec_fn=None if self.detach else _set_pdeathsig)
        logf.close()
        self.procs[name] = proc
        self.pids[name] = (proc.pid, argv[0] if name != "nodeagent" else "tests.harness.nodeagent")
        self._write_state()

    def _write_state(self) -> None:
        state = {"pids": {k: {"pid": p, "exe": e} for k, (p, e) in self.pids.items()},
                 "kubeconfig": str(self.kubeconfig) if self.kubeconfig else None,
                 "server": self.server, "version": self.version,
                 "kubectl": str(self.kubectl_bin), "helm": str(self.helm_bin)}
        (self.run_dir / "state.json").write_text(json.dumps(state, indent=2) + "\n")

    def _log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.run_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode} during start-up; "
                    f"log {self.run_dir / (name + '.log')}:\n{self._log_tail(name)}")

    def _ssl_context(self) -> ssl.SSLContext:
        pki = self.run_dir / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return ctx

    def _get(self, path: str, ctx: ssl.SSLContext, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.server + path, context=ctx, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            return 0, str(e)

    def _wait(self, what: str, predicate, timeout: float | None = None) -> None:
        end = time.monotonic() + (timeout or self.start_timeout)
        last = ""
        while time.monotonic() < end:
            self._check_alive()
            ok, last = predicate()
            if ok:
                return
            time.sleep(0.25)
        raise ControlPlaneError(f"timed out after {timeout or self.start_timeout:.0f}s waiting "
                                f"for {what}; last answer: {last}\nkube-apiserver log tail:\n"
                                f"{self._log_tail('kube-apiserver')}")

    # ----------------------------------------------------------------- start/stop
    def start(self) -> "ControlPlane":
        """Start every component and wait until the API is ready; returns self."""
        t0 = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        _log(f"control plane {self.version} ready at {self.server} in "
             f"{time.monotonic() - t0:.1f}s (run dir {self.run_dir})")
        return self

    def _start(self) -> None:
        b = self.binaries
        pki = self.run_dir / "pki"
        make_pki(pki)
        etcd_client, etcd_peer = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_client}"
        self._spawn("etcd", [
            str(b.etcd), "--name=default", f"--data-dir={self.run_dir / 'etcd-data'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync=true", "--log-level=warn", "--quota-backend-bytes=2147483648",
            "--snapshot-count=10000"])

        def etcd_ok():
            try:
                with urllib.request.urlopen(etcd_url + "/health", timeout=2) as r:
                    body = r.read().decode()
                    return '"health":"true"' in body.replace(" ", ""), body
            except (urllib.error.URLError, OSError) as e:
                return False, str(e)
        self._wait("etcd /health", etcd_ok)

        api_port = free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        self._spawn("kube-apiserver", [
            str(b.kube_apiserver), f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}", f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=RBAC", "--anonymous-auth=false",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--endpoint-reconciler-type=none", "--allow-privileged=true",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            "--profiling=false", "--event-ttl=1h", "--v=0"])
        self.kubeconfig = write_kubeconfig(self.run_dir / "kubeconfig", self.server, pki,
                                           "admin")
        kcm_kubeconfig = write_kubeconfig(self.run_dir / "kube-controller-manager.kubeconfig",
                                          self.server, pki, "kube-controller-manager")
        self._write_state()
        ctx = self._ssl_context()

        def ready():
            code, body = self._get("/readyz", ctx)
            return code == 200, f"HTTP {code}: {body[-500:]}"
        self._wait("kube-apiserver /readyz", ready)

        self._spawn("kube-controller-manager", [
            str(b.kube_controller_manager), f"--kubeconfig={kcm_kubeconfig}",
            f"--authentication-kubeconfig={kcm_kubeconfig}",
            f"--authorization-kubeconfig={kcm_kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--cert-dir={self.run_dir / 'kcm-certs'}",
            "--leader-elect=false", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--controllers=*", "--cluster-name=mail-selfcheck",
            *KCM_THROUGHPUT_FLAGS, "--v=0"])

        def default_sa():
            code, body = self._get("/api/v1/namespaces/default/serviceaccounts/default", ctx)
            return code == 200, f"HTTP {code}: {body[-300:]}"
        self._wait("the `default` service account (serviceaccount controller)", default_sa)

        if self.node_agent:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
            self._spawn("nodeagent", [
                sys.executable, "-m", "tests.harness.nodeagent",
                f"--kubeconfig={self.kubeconfig}", f"--work-dir={self.run_dir / 'pods'}"],
                env=env)

            def node_ready():
                code, body = self._get("/api/v1/nodes", ctx)
                return code == 200 and '"Ready"' in body, f"HTTP {code}: {body[-300:]}"
            self._wait("the node agent's Node", node_ready)

    def stop(self) -> None:
        """Stop every started process by PID (node agent, controller-manager, apiserver,
        etcd), SIGTERM then SIGKILL after 10 s. Idempotent."""
        for name in ("nodeagent", "kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self.procs:
                terminate(self.procs.pop(name))
            elif name in self.pids:
                stop_pid(*self.pids[name])
            self.pids.pop(name, None)
        if self.run_dir.exists():
            self._write_state()

    def __enter__(self) -> "ControlPlane":
        return self.start() if not self.procs else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- clients
    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``KUBECONFIG`` and the binaries' directories first on PATH."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = os.pathsep.join([str(self.kubectl_bin.parent), str(self.helm_bin.parent),
                                       env.get("PATH", "")])
        return env

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run ``kubectl --kubeconfig=... ARGS``; text output captured.

        :raises CommandError: (a ``subprocess.CalledProcessError`` whose message includes
            stderr) on a non-zero exit when ``check``.
        """
        proc = subprocess.run([str(self.kubectl_bin), f"--kubeconfig={self.kubeconfig}", *args],
                              input=input, capture_output=True, text=True, timeout=timeout,
                              env=self.env())
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def helm(self, *args: str, check: bool = True, timeout: float = 300.0
             ) -> subprocess.CompletedProcess:
        """Run ``helm --kubeconfig=... ARGS`` (same contract as :meth:`kubectl`)."""
        proc = subprocess.run([str(self.helm_bin), f"--kubeconfig={self.kubeconfig}", *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env())
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def service_account_kubeconfig(self, namespace: str, service_account: str, path: Path,
                                   duration: str = "1h") -> Path:
        """Write a kubeconfig at ``path`` that authenticates as ``namespace/service_account``
        with a TokenRequest token (``kubectl create token``), so a process on the host runs
        with exactly that ServiceAccount's RBAC. Returns ``path`` (mode 0600)."""
        import base64

        import yaml

        token = self.kubectl("-n", namespace, "create", "token", service_account,
                             f"--duration={duration}").stdout.strip()
        admin = yaml.safe_load(self.kubeconfig.read_text())
        cluster = dict(admin["clusters"][0]["cluster"])
        if "certificate-authority" in cluster:
            ca = Path(cluster.pop("certificate-authority"))
            if not ca.is_absolute():
                ca = self.kubeconfig.parent / ca
            cluster["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "local", "cluster": cluster}],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "local", "user": service_account,
                                                    "namespace": namespace}}],
            "current-context": "sa",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def api_client(self):
        """A new ``kubernetes.client.ApiClient`` authenticated as the admin."""
        from kubernetes import config
        return config.new_client_from_config(config_file=str(self.kubeconfig))


def default_run_dir() -> Path:
    env = os.environ.get("MAIL_SELFCHECK_RUN_DIR")
    return Path(env) if env else cache_root() / "run"


def _load_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _state_running(state: dict | None) -> bool:
    return bool(state) and any(_pid_alive(v["pid"], v["exe"])
                               for v in state.get("pids", {}).values())


def down(run_dir: Path | None = None) -> bool:
    """Stop the processes recorded in ``run_dir/state.json``; True if any was running."""
    run_dir = run_dir or default_run_dir()
    state = _load_state(run_dir)
    if not state:
        return False
    running = _state_running(state)
    pids = state.get("pids", {})
    for name in ("nodeagent", "kube-controller-manager", "kube-apiserver", "etcd"):
        if name in pids:
            stop_pid(pids[name]["pid"], pids[name]["exe"])
    state["pids"] = {}
    (run_dir / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    return running


# --------------------------------------------------------------------------- CLI
def _print_env(state: dict) -> None:
    print(f"export KUBECONFIG={state['kubeconfig']}")
    bindirs = os.pathsep.join(sorted({str(Path(state['kubectl']).parent),
                                      str(Path(state['helm']).parent)}))
    print(f'export PATH="{bindirs}:$PATH"')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.controlplane",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or find in the cache) the pinned binaries")
    up_p = sub.add_parser("up", help="start the control plane and node agent in the background")
    up_p.add_argument("--no-node-agent", action="store_true")
    sub.add_parser("down", help="stop what `up` started (by PID)")
    sub.add_parser("env", help="print the export lines for the running control plane")
    args = parser.parse_args(argv)
    run_dir = default_run_dir()
    if args.cmd == "build":
        b = build_all()
        for name in ("etcd", "kube_apiserver", "kube_controller_manager", "kubectl", "helm"):
            print(f"{name}: {getattr(b, name)}")
        return 0
    if args.cmd == "up":
        if _state_running(_load_state(run_dir)):
            _log(f"already running (state in {run_dir}); `down` first")
            _print_env(_load_state(run_dir))
            return 0
        b = build_all()
        if run_dir.exists():
            shutil.rmtree(run_dir)
        cp = ControlPlane(b, run_dir, detach=True, node_agent=not args.no_node_agent)
        cp.start()
        _print_env(_load_state(run_dir))
        return 0
    if args.cmd == "down":
        was = down(run_dir)
        _log("stopped" if was else "nothing was running")
        return 0
    if args.cmd == "env":
        state = _load_state(run_dir)
        if not _state_running(state):
            _log("not running; use `up`")
            return 1
        _print_env(state)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
