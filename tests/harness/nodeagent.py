"""A stand-in for the kubelet, and only for it: runs Job pods as local subprocesses.

The control plane of :mod:`tests.harness.controlplane` is real (etcd, kube-apiserver,
kube-controller-manager with the real Job and garbage-collector controllers). What it lacks
is a node. This agent plays the node's kubelet for the pods of Jobs:

* It registers a ``Node`` (default name ``mail-selfcheck-node``, ``Ready``, InternalIP
  127.0.0.1) and renews its ``Lease`` in ``kube-node-lease`` every 10 s, as a kubelet does
  (https://kubernetes.io/docs/concepts/architecture/nodes/#node-heartbeats).
* It watches pods in the namespaces it is told (default: every namespace except
  ``kube-system``, ``kube-public`` and ``kube-node-lease``). Pods owned by a ``Job``
  (``ownerReferences[].kind == "Job"``; any pod with ``--any-pod``) that are not yet bound
  are bound to its node through the ``pods/binding`` subresource (there is no scheduler).
* For each bound pod it runs each container's ``command`` + ``args`` as a local subprocess
  (``$(VAR)`` references expanded as the kubelet does), with the container's environment:
  literal ``value``, ``valueFrom.secretKeyRef`` / ``configMapKeyRef`` / ``fieldRef``, and
  ``envFrom`` (``secretRef`` / ``configMapRef``, ``prefix``), read from the API;
  ``optional`` is honoured. A missing non-optional Secret, ConfigMap or key leaves the pod
  ``Pending`` with ``containerStatuses[].state.waiting.reason = CreateContainerConfigError``
  and the kubelet's message, retried every 5 s (the kubelet's behaviour). ``PATH`` is the
  container's ``PATH`` (else the host's) prefixed with ``dirname(sys.executable)``, so the
  venv's console scripts (``mail-selfcheck``) resolve. ``HOSTNAME`` is the pod name.
* ``terminationMessagePath`` (default ``/dev/termination-log``) is mapped to a per-pod host
  file: exact occurrences of the path in ``command``, ``args`` and literal env values are
  substituted, and the file (at most 4096 bytes) is read after exit. With
  ``terminationMessagePolicy: FallbackToLogsOnError`` an empty file and a non-zero exit give
  the tail of the container's combined stdout/stderr (<= 80 lines, <= 2048 bytes), as in
  https://kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure/.
* It writes pod status like a kubelet: ``phase`` Running, then Succeeded (every container
  exited 0) or Failed; ``containerStatuses[].state`` running/terminated with ``exitCode``,
  ``reason`` (``Completed`` / ``Error``), ``message``, ``startedAt``, ``finishedAt``; the
  PodScheduled / PodReadyToStartContainers / Initialized / ContainersReady / Ready
  conditions. The real Job controller then marks the Job Complete or Failed.
  ``restartPolicy: OnFailure`` restarts a failed container in place (``restartCount``,
  10 s back-off doubling to 300 s).
* ``spec.activeDeadlineSeconds`` is honoured (processes killed; pod Failed with reason
  ``DeadlineExceeded``). When a pod is deleted (``deletionTimestamp`` set) its processes get
  SIGTERM, SIGKILL after ``terminationGracePeriodSeconds``, and the agent then confirms the
  deletion (``gracePeriodSeconds=0``) as the kubelet does, so garbage collection completes.

Out of scope, by design: image pulling (the ``image`` is ignored; the command runs on the
host with the current Python environment), container isolation of any kind (namespaces,
cgroups, resource limits), ``securityContext``, volumes and volume mounts (including the
service-account token), probes, init and sidecar containers (a pod with ``initContainers``
fails with a message saying so), ``kubectl logs``/``exec``, and image ``ENTRYPOINT``s: a
container without ``command`` gets ``CreateContainerConfigError`` unless its image is mapped in
``entrypoints`` (``NodeAgent(entrypoints={"ghcr.io/x/mail-selfcheck": ["mail-selfcheck"]})``
or ``--entrypoint IMAGE=CMD``; the tag/digest is ignored when matching).

Container output goes to ``<work_dir>/<namespace>_<pod>_<uid>/<container>.log``.

Use: ``NodeAgent(api_client, work_dir).start()`` / ``.stop()`` in-process (a thread), or
``python -m tests.harness.nodeagent --kubeconfig FILE --work-dir DIR [--namespace NS ...]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

log = logging.getLogger("mail_selfcheck.nodeagent")

SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})
DEFAULT_NODE_NAME = "mail-selfcheck-node"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MAX_TERMINATION_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
CONFIG_RETRY_SECONDS = 5.0
#: HTTP connections kept to the API server by the command-line agent: one thread per
#: running pod plus the binding threads share the client.
API_POOL_SIZE = 256
#: Pods bound concurrently (binding is one API call; the watch thread never waits for it).
BIND_THREADS = 16


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ContainerConfigError(Exception):
    """The kubelet's CreateContainerConfigError: an env source cannot be resolved."""


_EXPANSION_RE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Expand ``$(VAR)`` from ``env`` as the kubelet does; ``$$`` is a literal ``$``.

    Unknown references are left untouched (Kubernetes "Define dependent environment
    variables" semantics).
    """
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)
    return _EXPANSION_RE.sub(sub, value)


def tail_of_log(data: bytes, max_lines: int = FALLBACK_LOG_LINES,
                max_bytes: int = FALLBACK_LOG_BYTES) -> str:
    """The last ``max_lines`` lines of ``data``, at most ``max_bytes`` bytes (kubelet rule)."""
    lines = data.splitlines(keepends=True)[-max_lines:]
    out = b"".join(lines)[-max_bytes:]
    return out.decode("utf-8", errors="replace")


@dataclass
class _Run:
    """A running container process."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    msg_path: Path
    policy: str
    started_at: str


@dataclass
class _PodWorker:
    uid: str
    namespace: str
    name: str
    thread: threading.Thread | None = None
    deleted: threading.Event = field(default_factory=threading.Event)
    grace: int = 30
    runs: list[_Run] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class NodeAgent:
    """Plays the kubelet for Job pods (see the module docstring for exact semantics).

    :param api_client: an authenticated ``kubernetes.client.ApiClient`` (needs rights on
        nodes, leases, pods, pods/status, pods/binding, secrets and configmaps).
    :param work_dir: host directory for per-pod termination-message files and logs.
    :param namespaces: namespaces to serve; ``None`` means every non-system namespace.
    :param node_name: name of the Node object registered for this agent.
    :param any_pod: serve every pod, not only those owned by a Job.
    :param entrypoints: image (without tag/digest) -> command used when a container has
        no ``command``.
    """

    def __init__(self, api_client: client.ApiClient, work_dir: str | os.PathLike, *,
                 namespaces: list[str] | None = None, node_name: str = DEFAULT_NODE_NAME,
                 any_pod: bool = False, entrypoints: dict[str, list[str]] | None = None):
        self.api_client = api_client
        self.v1 = client.CoreV1Api(api_client)
        self.coord = client.CoordinationV1Api(api_client)
        self.work_dir = Path(work_dir)
        self.namespaces = set(namespaces) if namespaces else None
        self.node_name = node_name
        self.any_pod = any_pod
        self.entrypoints = dict(entrypoints or {})
        self._workers: dict[str, _PodWorker] = {}
        self._handled: set[str] = set()  # pod UIDs this agent has started (never rerun)
        self._binding: set[str] = set()  # pod UIDs whose binding is in flight
        self._binder = ThreadPoolExecutor(max_workers=BIND_THREADS,
                                          thread_name_prefix="nodeagent-bind")
        self._workers_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch: watch.Watch | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "NodeAgent":
        """Register the node and start the watch and heartbeat threads; returns self."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.register_node()
        for target, name in ((self._watch_loop, "nodeagent-watch"),
                             (self._heartbeat_loop, "nodeagent-heartbeat")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("node agent started as node %s", self.node_name)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching and kill every process still running (SIGKILL after 5 s).

        Pods are left as they are in the API (a stopped kubelet deletes nothing).
        """
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        with self._workers_lock:
            workers = list(self._workers.values())
        for w in workers:  # their threads see _stop, kill the processes, leave the pods be
            w.grace = min(w.grace, 5)
        deadline = time.monotonic() + timeout
        for w in workers:
            if w.thread is not None:
                w.thread.join(max(0.1, deadline - time.monotonic()))
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        self._binder.shutdown(wait=False, cancel_futures=True)

    def run_forever(self) -> None:
        """Start and block until SIGTERM/SIGINT, then stop."""
        self.start()
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        self.stop()

    # ------------------------------------------------------------------ node
    def register_node(self) -> None:
        """Create (or refresh) the Node object with a Ready condition."""
        body = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node_name, "labels": {
                "kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "mail-selfcheck.dev/node-agent": "true"}},
        }
        try:
            self.v1.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
        self._patch_node_status()
        self._renew_lease()

    def _patch_node_status(self) -> None:
        now = _now()
        status = {"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "mail-selfcheck node agent is posting ready status",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node_name}],
            "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "nodeInfo": {"kubeletVersion": "nodeagent", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "nodeagent://0",
                         "kernelVersion": os.uname().release, "osImage": "host",
                         "kubeProxyVersion": "", "machineID": "", "systemUUID": "",
                         "bootID": ""},
        }}
        self.v1.patch_node_status(self.node_name, status)

    def _renew_lease(self) -> None:
        now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": 40,
                         "renewTime": now}}
        try:
            self.coord.patch_namespaced_lease(self.node_name, "kube-node-lease",
                                              {"spec": body["spec"]})
        except ApiException as e:
            if e.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", body)

    def _heartbeat_loop(self) -> None:
        n = 0
        while not self._stop.wait(10.0):
            n += 1
            try:
                self._renew_lease()
                if n % 4 == 0:
                    self._patch_node_status()
            except Exception as e:  # noqa: BLE001 - keep beating
                log.warning("heartbeat failed: %s", e)

    # ------------------------------------------------------------------ watch
    def _serves(self, pod: client.V1Pod) -> bool:
        ns = pod.metadata.namespace
        if self.namespaces is not None:
            if ns not in self.namespaces:
                return False
        elif ns in SYSTEM_NAMESPACES:
            return False
        if pod.spec.node_name and pod.spec.node_name != self.node_name:
            return False
        if self.any_pod:
            return True
        return any(o.kind == "Job" for o in (pod.metadata.owner_references or []))

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.v1.list_pod_for_all_namespaces()
                seen = set()
                for pod in pods.items:
                    seen.add(pod.metadata.uid)
                    self._on_pod(pod)
                self._forget_missing(seen)
                self._watch = watch.Watch()
                for ev in self._watch.stream(self.v1.list_pod_for_all_namespaces,
                                             resource_version=pods.metadata.resource_version,
                                             timeout_seconds=300,
                                             allow_watch_bookmarks=False):
                    if self._stop.is_set():
                        break
                    pod = ev["object"]
                    if ev["type"] == "DELETED":
                        self._on_deleted(pod)
                    elif ev["type"] in ("ADDED", "MODIFIED"):
                        self._on_pod(pod)
            except Exception as e:  # noqa: BLE001 - relist on any error (410 Gone included)
                if self._stop.is_set():
                    break
                log.warning("pod watch ended (%s); relisting", e)
                self._stop.wait(1.0)

    def _forget_missing(self, seen: set[str]) -> None:
        with self._workers_lock:
            gone = [w for uid, w in self._workers.items() if uid not in seen]
        for w in gone:
            w.grace = 0
            w.deleted.set()

    def _on_deleted(self, pod: client.V1Pod) -> None:
        with self._workers_lock:
            w = self._workers.get(pod.metadata.uid)
        if w is not None:
            w.grace = 0
            w.deleted.set()

    def _on_pod(self, pod: client.V1Pod) -> None:
        if not self._serves(pod):
            return
        uid = pod.metadata.uid
        with self._workers_lock:
            w = self._workers.get(uid)
            handled = uid in self._handled
        if pod.metadata.deletion_timestamp is not None:
            if w is not None:
                w.grace = pod.metadata.deletion_grace_period_seconds or 0
                w.deleted.set()
            elif pod.spec.node_name == self.node_name:
                self._confirm_deletion(pod.metadata.namespace, pod.metadata.name, uid)
            return
        if not pod.spec.node_name:
            with self._workers_lock:
                if uid in self._binding:
                    return
                self._binding.add(uid)
            # Bind off the watch thread: one API round trip per pod would cap the agent at
            # ~1/latency pods per second (measured: the bottleneck at 17 pods/s under load).
            self._binder.submit(self._bind_and_run, pod)
            return
        if w is not None or handled:
            return
        phase = pod.status.phase if pod.status else None
        if phase in ("Succeeded", "Failed"):
            return
        w = _PodWorker(uid=uid, namespace=pod.metadata.namespace, name=pod.metadata.name,
                       grace=pod.spec.termination_grace_period_seconds or 30)
        with self._workers_lock:
            self._workers[uid] = w
            self._handled.add(uid)
        if phase == "Running":
            # Running on this node but not by this process: the agent restarted.
            self._patch_status(w, {"phase": "Failed", "reason": "NodeAgentRestarted",
                                   "message": "the node agent restarted while the pod ran"})
            with self._workers_lock:
                self._workers.pop(uid, None)
            return
        w.thread = threading.Thread(target=self._run_pod, args=(pod, w),
                                    name=f"pod-{w.namespace}/{w.name}", daemon=True)
        w.thread.start()

    def _bind_and_run(self, pod: client.V1Pod) -> None:
        """Bind ``pod`` and start it at once (its bound MODIFIED event then finds it handled)."""
        try:
            if self._bind(pod):
                pod.spec.node_name = self.node_name
                self._on_pod(pod)
        except Exception:  # noqa: BLE001 - a pod left unbound is retried on the next relist
            log.exception("binding %s/%s failed", pod.metadata.namespace, pod.metadata.name)
        finally:
            with self._workers_lock:
                self._binding.discard(pod.metadata.uid)

    def _bind(self, pod: client.V1Pod) -> bool:
        body = client.V1Binding(
            metadata=client.V1ObjectMeta(name=pod.metadata.name),
            target=client.V1ObjectReference(api_version="v1", kind="Node",
                                            name=self.node_name))
        try:
            # _preload_content=False: the client cannot deserialize the Status it returns.
            resp = self.v1.create_namespaced_pod_binding(pod.metadata.name,
                                                         pod.metadata.namespace, body,
                                                         _preload_content=False)
            resp.drain_conn()  # read it out and return the connection to the pool: unread,
            resp.release_conn()  # it would leak its connection (a TLS handshake per pod)
            log.info("bound %s/%s to %s", pod.metadata.namespace, pod.metadata.name,
                     self.node_name)
            return True
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("binding %s/%s failed: %s", pod.metadata.namespace,
                            pod.metadata.name, e)
            return False

    def _confirm_deletion(self, namespace: str, name: str, uid: str) -> None:
        try:
            resp = self.v1.delete_namespaced_pod(
                name, namespace, grace_period_seconds=0,
                body=client.V1DeleteOptions(grace_period_seconds=0,
                                            preconditions=client.V1Preconditions(uid=uid)),
                _preload_content=False)
            resp.drain_conn()
            resp.release_conn()
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("confirming deletion of %s/%s failed: %s", namespace, name, e)

    # ------------------------------------------------------------------ env
    def _lookup(self, kind: str, namespace: str, name: str) -> dict[str, str] | None:
        """Data of a Secret (decoded) or ConfigMap, or None if it does not exist."""
        import base64
        try:
            if kind == "Secret":
                obj = self.v1.read_namespaced_secret(name, namespace)
                return {k: base64.b64decode(v).decode("utf-8", errors="replace")
                        for k, v in (obj.data or {}).items()}
            obj = self.v1.read_namespaced_config_map(name, namespace)
            return dict(obj.data or {})
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _field_ref(self, pod: client.V1Pod, path: str) -> str:
        md = pod.metadata
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            src = (md.labels if m.group(1) == "labels" else md.annotations) or {}
            return src.get(m.group(2), "")
        values = {"metadata.name": md.name, "metadata.namespace": md.namespace,
                  "metadata.uid": md.uid, "spec.nodeName": self.node_name,
                  "spec.serviceAccountName": pod.spec.service_account_name or "default",
                  "status.hostIP": "127.0.0.1", "status.hostIPs": "127.0.0.1",
                  "status.podIP": "127.0.0.1", "status.podIPs": "127.0.0.1"}
        if path not in values:
            raise ContainerConfigError(f"unsupported fieldRef fieldPath {path!r}")
        return values[path] or ""

    def resolve_env(self, pod: client.V1Pod, container: client.V1Container,
                    msg_from: str, msg_to: str) -> dict[str, str]:
        """The container's environment, as the kubelet computes it.

        :raises ContainerConfigError: a non-optional Secret/ConfigMap or key is missing.
        """
        ns = pod.metadata.namespace
        env: dict[str, str] = {}
        cache: dict[tuple[str, str], dict[str, str] | None] = {}

        def lookup(kind: str, name: str) -> dict[str, str] | None:
            # One read per Secret/ConfigMap and container (the kubelet caches them too).
            if (kind, name) not in cache:
                cache[kind, name] = self._lookup(kind, ns, name)
            return cache[kind, name]

        for src in container.env_from or []:
            ref = src.secret_ref or src.config_map_ref
            kind = "Secret" if src.secret_ref else "ConfigMap"
            data = lookup(kind, ref.name)
            if data is None:
                if ref.optional:
                    continue
                raise ContainerConfigError(f'{kind.lower()} "{ref.name}" not found')
            for k, v in data.items():
                env[(src.prefix or "") + k] = v
        for var in container.env or []:
            if var.value_from is None:
                env[var.name] = expand((var.value or "").replace(msg_from, msg_to), env)
                continue
            vf = var.value_from
            if vf.secret_key_ref or vf.config_map_key_ref:
                ref = vf.secret_key_ref or vf.config_map_key_ref
                kind = "Secret" if vf.secret_key_ref else "ConfigMap"
                data = lookup(kind, ref.name)
                if data is None:
                    if ref.optional:
                        continue
                    raise ContainerConfigError(f'{kind.lower()} "{ref.name}" not found')
                if ref.key not in data:
                    if ref.optional:
                        continue
                    raise ContainerConfigError(
                        f"couldn't find key {ref.key} in {kind} {ns}/{ref.name}")
                env[var.name] = data[ref.key]
            elif vf.field_ref:
                env[var.name] = self._field_ref(pod, vf.field_ref.field_path)
            else:
                raise ContainerConfigError(
                    f"env {var.name}: only value, secretKeyRef, configMapKeyRef and fieldRef "
                    "are supported by the node agent")
        return env

    # ------------------------------------------------------------------ run
    def _command(self, container: client.V1Container) -> list[str]:
        if container.command:
            return list(container.command) + list(container.args or [])
        image = re.split(r"[@]", container.image or "")[0]
        image = re.sub(r":[^/:]+$", "", image)
        if image in self.entrypoints:
            return list(self.entrypoints[image]) + list(container.args or [])
        raise ContainerConfigError(
            f"container {container.name} has no command and image {container.image!r} has no "
            "entrypoint mapping (the node agent cannot read image entrypoints)")

    def _pod_dir(self, w: _PodWorker) -> Path:
        d = self.work_dir / f"{w.namespace}_{w.name}_{w.uid[:8]}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _patch_status(self, w: _PodWorker, status: dict[str, Any]) -> None:
        try:
            # Raw response, drained unparsed: building a V1Pod model per patch costs more CPU
            # than the patch itself (measured: the agent's share at 17 pods/s).
            resp = self.v1.patch_namespaced_pod_status(
                w.name, w.namespace, {"status": status},
                _content_type="application/merge-patch+json", _preload_content=False)
            resp.drain_conn()
            resp.release_conn()
        except ApiException as e:
            if e.status != 404:
                log.warning("status patch of %s/%s failed: %s", w.namespace, w.name, e)

    @staticmethod
    def _conditions(started: str, ready: bool, reason: str | None = None) -> list[dict]:
        conds = [{"type": "PodReadyToStartContainers", "status": "True",
                  "lastTransitionTime": started},
                 {"type": "Initialized", "status": "True", "lastTransitionTime": started}]
        for t in ("ContainersReady", "Ready"):
            c = {"type": t, "status": "True" if ready else "False",
                 "lastTransitionTime": _now()}
            if reason:
                c["reason"] = reason
            conds.append(c)
        conds.append({"type": "PodScheduled", "status": "True",
                      "lastTransitionTime": started})
        return conds

    def _base_status(self, started: str) -> dict[str, Any]:
        return {"hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
                "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
                "startTime": started}  # qosClass: set by the API server at creation, immutable

    def _run_pod(self, pod: client.V1Pod, w: _PodWorker) -> None:
        try:
            self._run_pod_inner(pod, w)
        except Exception as e:  # noqa: BLE001 - report, never crash the agent
            log.exception("pod %s/%s: node agent error", w.namespace, w.name)
            self._patch_status(w, {"phase": "Failed", "reason": "NodeAgentError",
                                   "message": str(e)[:1024]})
        finally:
            for r in w.runs:
                if r.proc.poll() is None:
                    r.proc.kill()
            if w.deleted.is_set():
                self._confirm_deletion(w.namespace, w.name, w.uid)
            with self._workers_lock:
                self._workers.pop(w.uid, None)

    def _deadline(self, pod: client.V1Pod, t0: float) -> float | None:
        ads = pod.spec.active_deadline_seconds
        return t0 + ads if ads else None

    def _run_pod_inner(self, pod: client.V1Pod, w: _PodWorker) -> None:
        started = _now()
        t0 = time.monotonic()
        deadline = self._deadline(pod, t0)
        pod_dir = self._pod_dir(w)
        if pod.spec.init_containers:
            self._patch_status(w, {**self._base_status(started), "phase": "Failed",
                                   "reason": "UnsupportedByNodeAgent",
                                   "message": "initContainers are not supported by the "
                                              "mail-selfcheck node agent"})
            return
        # 1. Resolve the configuration, retrying like the kubelet while it is missing.
        prepared = []
        while True:
            try:
                prepared = [self._prepare(pod, c, pod_dir) for c in pod.spec.containers]
                break
            except ContainerConfigError as e:
                self._patch_status(w, {
                    **self._base_status(started), "phase": "Pending",
                    "conditions": self._conditions(started, False, "ContainersNotReady"),
                    "containerStatuses": [{
                        "name": c.name, "image": c.image, "imageID": "", "ready": False,
                        "started": False, "restartCount": 0,
                        "state": {"waiting": {"reason": "CreateContainerConfigError",
                                              "message": str(e)}}}
                        for c in pod.spec.containers]})
                if self._wait_or_deadline(w, deadline, CONFIG_RETRY_SECONDS):
                    return self._end_early(pod, w, started, deadline)
        # 2. Run every container (concurrently, as in a pod), restarting on failure if asked.
        restart_policy = pod.spec.restart_policy or "Always"
        restarts = {c.name: 0 for c in pod.spec.containers}
        results: dict[str, dict] = {}
        previous: dict[str, dict] = {}  # the terminated state before the last restart
        pending = {p["name"]: p for p in prepared}
        backoff = {name: 10.0 for name in pending}
        while pending:
            w.runs = [self._spawn(p) for p in pending.values()]
            self._patch_status(w, {
                **self._base_status(started), "phase": "Running",
                "conditions": self._conditions(started, True),
                "containerStatuses": [self._cstatus(c, restarts[c.name], results.get(c.name),
                                                    next((r for r in w.runs
                                                          if r.name == c.name), None))
                                      for c in pod.spec.containers]})
            while any(r.proc.poll() is None for r in w.runs):
                if self._wait_or_deadline(w, deadline, 0.2):
                    return self._end_early(pod, w, started, deadline)
            for r in w.runs:
                results[r.name] = self._terminated(r)
                if results[r.name]["exitCode"] == 0 or restart_policy == "Never":
                    pending.pop(r.name, None)
            if pending:
                # OnFailure / Always: restart failed containers in place after a back-off.
                for name in pending:
                    restarts[name] += 1
                    previous[name] = results[name]
                self._patch_status(w, {
                    "phase": "Running",
                    "containerStatuses": [
                        self._cstatus(c, restarts[c.name], results.get(c.name), None,
                                      waiting="CrashLoopBackOff" if c.name in pending else None)
                        for c in pod.spec.containers]})
                delay = max(backoff[n] for n in pending)
                for n in pending:
                    backoff[n] = min(backoff[n] * 2, 300.0)
                if self._wait_or_deadline(w, deadline, delay):
                    return self._end_early(pod, w, started, deadline)
        ok = all(r["exitCode"] == 0 for r in results.values())
        reason = "PodCompleted" if ok else "PodFailed"
        self._patch_status(w, {
            **self._base_status(started), "phase": "Succeeded" if ok else "Failed",
            "conditions": self._conditions(started, False, reason),
            "containerStatuses": [self._cstatus(c, restarts[c.name], results.get(c.name), None,
                                                prev=previous.get(c.name))
                                  for c in pod.spec.containers]})
        log.info("pod %s/%s finished: %s", w.namespace, w.name,
                 {k: v["exitCode"] for k, v in results.items()})

    def _wait_or_deadline(self, w: _PodWorker, deadline: float | None, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the pod was deleted or its deadline passed."""
        if deadline is not None:
            seconds = max(0.0, min(seconds, deadline - time.monotonic()))
        if w.deleted.wait(seconds) or self._stop.is_set():
            return True
        return deadline is not None and time.monotonic() >= deadline

    def _end_early(self, pod: client.V1Pod, w: _PodWorker, started: str,
                   deadline: float | None) -> None:
        """Kill processes after deletion, agent stop or activeDeadlineSeconds."""
        self._kill(w)
        if w.deleted.is_set() or self._stop.is_set():
            return
        ads = pod.spec.active_deadline_seconds
        self._patch_status(w, {
            "phase": "Failed", "reason": "DeadlineExceeded",
            "message": "Pod was active on the node longer than the specified deadline",
            "conditions": self._conditions(started, False, "PodFailed"),
            "containerStatuses": [self._cstatus(c, 0, self._terminated(r), None)
                                  for c in pod.spec.containers
                                  for r in w.runs if r.name == c.name] or None})
        log.info("pod %s/%s exceeded activeDeadlineSeconds=%s", w.namespace, w.name, ads)

    def _kill(self, w: _PodWorker) -> None:
        live = [r for r in w.runs if r.proc.poll() is None]
        for r in live:
            with _suppress():
                os.killpg(r.proc.pid, signal.SIGTERM)
        end = time.monotonic() + max(0, w.grace)
        for r in live:
            try:
                r.proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait()

    def _prepare(self, pod: client.V1Pod, c: client.V1Container, pod_dir: Path) -> dict:
        msg_from = c.termination_message_path or DEFAULT_TERMINATION_MESSAGE_PATH
        msg_path = pod_dir / f"{c.name}.termination-log"
        env = self.resolve_env(pod, c, msg_from, str(msg_path))
        argv = [expand(a.replace(msg_from, str(msg_path)), env) for a in self._command(c)]
        pydir = os.path.dirname(sys.executable)
        env["PATH"] = pydir + os.pathsep + env.get("PATH", os.environ.get("PATH", ""))
        env.setdefault("HOME", os.environ.get("HOME", "/root"))
        env.setdefault("HOSTNAME", pod.metadata.name)
        cwd = c.working_dir if c.working_dir and os.path.isdir(c.working_dir) else pod_dir
        return {"name": c.name, "argv": argv, "env": env, "cwd": str(cwd),
                "msg_path": msg_path, "log_path": pod_dir / f"{c.name}.log",
                "policy": c.termination_message_policy or "File"}

    def _spawn(self, p: dict) -> _Run:
        p["msg_path"].write_bytes(b"")
        started = _now()
        with open(p["log_path"], "ab") as logf:
            try:
                proc = subprocess.Popen(p["argv"], env=p["env"], cwd=p["cwd"],
                                        stdin=subprocess.DEVNULL, stdout=logf,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                # The kubelet's StartError: run a process that reports it with exit 128.
                logf.write(f"StartError: {e}\n".encode())
                proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(128)"],
                                        stdin=subprocess.DEVNULL, start_new_session=True)
                p["msg_path"].write_text(f"failed to start container: {e}"[:4096])
        return _Run(name=p["name"], proc=proc, log_path=p["log_path"],
                    msg_path=p["msg_path"], policy=p["policy"], started_at=started)

    def _terminated(self, r: _Run) -> dict:
        code = r.proc.poll()
        if code is None:
            code = 137
        elif code < 0:  # killed by a signal: the runtime reports 128 + signal
            code = 128 - code
        try:
            with open(r.msg_path, "rb") as fh:
                msg = fh.read(MAX_TERMINATION_MESSAGE_BYTES).decode("utf-8", errors="replace")
        except OSError:
            msg = ""
        if not msg and code != 0 and r.policy == "FallbackToLogsOnError":
            try:
                msg = tail_of_log(r.log_path.read_bytes())
            except OSError:
                msg = ""
        term = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                "startedAt": r.started_at, "finishedAt": _now(),
                "containerID": f"nodeagent://{r.proc.pid}"}
        if msg:
            term["message"] = msg
        return term

    @staticmethod
    def _cstatus(c: client.V1Container, restarts: int, last: dict | None,
                 run: _Run | None, waiting: str | None = None,
                 prev: dict | None = None) -> dict:
        st: dict[str, Any] = {"name": c.name, "image": c.image, "imageID": "",
                              "restartCount": restarts}
        if run is not None:
            st.update(ready=True, started=True,
                      containerID=f"nodeagent://{run.proc.pid}",
                      state={"running": {"startedAt": run.started_at}})
            if last:
                st["lastState"] = {"terminated": last}
        elif waiting:
            st.update(ready=False, started=False,
                      state={"waiting": {"reason": waiting,
                                         "message": "back-off restarting failed container"}})
            if last:
                st["lastState"] = {"terminated": last}
        elif last:
            st.update(ready=False, started=False, containerID=last["containerID"],
                      state={"terminated": last})
            if prev:
                st["lastState"] = {"terminated": prev}
        else:
            st.update(ready=False, started=False, state={"waiting": {"reason": "PodInitializing"}})
        return st


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.nodeagent",
                                     description="Run Job pods as local processes "
                                                 "(a kubelet stand-in for tests).")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--namespace", action="append", dest="namespaces",
                        help="serve only this namespace (repeatable); default all non-system")
    parser.add_argument("--node-name", default=DEFAULT_NODE_NAME)
    parser.add_argument("--any-pod", action="store_true", help="serve pods not owned by Jobs")
    parser.add_argument("--entrypoint", action="append", default=[], metavar="IMAGE=CMD",
                        help="command for containers of IMAGE that have no command")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configuration = client.Configuration()
    config.load_kube_config(config_file=args.kubeconfig, client_configuration=configuration)
    # One thread per running pod shares this client: the default pool (4 connections)
    # would open and discard a TLS connection per request beyond 4 under load.
    configuration.connection_pool_maxsize = API_POOL_SIZE
    api = client.ApiClient(configuration)
    entry = {}
    for spec in args.entrypoint:
        image, _, cmd = spec.partition("=")
        entry[image] = cmd.split()
    NodeAgent(api, args.work_dir, namespaces=args.namespaces, node_name=args.node_name,
              any_pod=args.any_pod, entrypoints=entry).run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
