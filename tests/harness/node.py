"""A real Kubernetes node for the test control plane: kubelet + containerd + runc + CNI (issue 11).

:mod:`tests.harness.controlplane` runs etcd, kube-apiserver and kube-controller-manager on the
host's loopback. This module adds what a real cluster has on top: **kube-scheduler** (on the
host, like the other control-plane components) and a **node**: the upstream **kubelet**, the
**containerd** CRI runtime with **runc**, and a **CNI bridge** network for pods. Pods are real
containers made from images imported into containerd (nothing is pulled from any registry).

Versions (why)
    * kubelet **v1.35.4** (``NODE_K8S_VERSION``): the API server is v1.36.3 and a kubelet may
      be up to three minors older (version skew policy); 1.35 is the last minor that supports
      containerd 1.x, and Debian 12 ships containerd 1.6.20. It runs on this machine's cgroup
      v1 hierarchy only with ``failCgroupV1: false``, which the generated config sets.
    * kube-scheduler **v1.36.3** (the API server's version, as a control-plane component).
    * containerd 1.6.20, runc 1.1.5, containernetworking-plugins 1.1.1: Debian 12's packages
      (``hack/install-system-deps.sh``). containerd 1.6 serves the CRI v1 API the kubelet uses.
    * No kube-proxy: the one Service that pods need, ``kubernetes`` (10.96.0.1:443), is an
      address of the node's namespace where the forwarder listens (see Network); the other
      Services of the tests are never dialled by pods.

Network (no packet leaves the machine)
    The node runs in a network namespace made by this module (``unshare --net=FILE``), with
    only ``lo`` (addresses 10.200.0.1 = the node IP, 10.96.0.1 = the ``kubernetes`` Service)
    and the CNI bridge ``msc0`` (10.244.0.1/24, pods in 10.244.0.0/24). There is no veth to
    the host, no default route: ``ip route get 1.1.1.1`` there answers "Network is
    unreachable". Traffic that must cross goes through :mod:`tests.harness.node_forward`, a
    user-space TCP forwarder with one socket in each namespace:

    * node ns ``127.0.0.1:APIPORT`` and ``10.96.0.1:443`` -> host API server (kubelet, pods);
    * host ``127.0.0.1:KUBELETPORT`` -> node ns kubelet (``kubectl logs``/``exec``: the API
      server dials the node's ``Hostname`` address, ``localhost``, which is also the node's name);
    * :meth:`Node.expose` adds node ns ``10.200.0.1:PORT`` -> host ``127.0.0.1:PORT`` (the
      mail stack).

Mounts and sysctls
    containerd and the kubelet share a private mount namespace (``unshare --mount=FILE``):
    overlay rootfs, tmpfs volumes and pod netns files are invisible on the host and vanish
    with it. The kubelet runs with ``protectKernelDefaults: true`` and, in that namespace
    only, read-only bind mounts over ``/proc/sys/{vm,kernel}/...`` holding the values it
    expects, so it never writes the host's global sysctls (``kernel.panic``, overcommit...).
    Pod cgroups live under ``/<cgroupRoot>=/mail-selfcheck-node-<id>`` of each cgroup v1
    hierarchy, removed at stop.

Build (``python -m tests.harness.node build``, ``hack/build-node.sh``): kubelet and
kube-scheduler from the ``k8s.io/kubernetes`` wrapper module (:func:`controlplane.build_kubernetes`),
a static ``pause`` binary (Go) and its image, the app image (``hack/build-image.sh``),
``docker-archive`` exports of both images and a containerd root holding both, imported and
unpacked (:func:`image_root`), all cached in ``$MAIL_SELFCHECK_CACHE``
(``~/.cache/mail-selfcheck``): ``k8s-node-v1.35.4/``, ``k8s-scheduler-v1.36.3/``,
``pause-1/``, ``node-images/<name>-<image id>.tar``, ``node-images/containerd-root-<key>/``.
Idempotent; a second call builds nothing. Image builds and exports hold the cache's build
lock, so runs that build at the same time each get the archive of their own build.

The app image is rebuilt when no build of the same context is cached
(:func:`image_context_digest` over the Dockerfile, ``hack/build-image.sh`` and the
``.dockerignore`` allowlist: pyproject.toml, constraints.txt, README.md, operator/; a stamp
``node-images/<name>-context-<digest>.json`` names the image ID that build printed): after a
source change 2-5 min on buildah's vfs storage, else nothing (no buildah call either). The
archive is exported by that ID, so two trees on one machine (a CI clone and the working tree)
that share the ``localhost/mail-selfcheck:dev`` tag each run their own image.
``MAIL_SELFCHECK_NODE_IMAGE_BUILD=0`` takes whatever the tag names now, even if the sources
changed (local iteration only).

Run: :func:`start_cluster(cp, node) <start_cluster>` starts the control plane while the node
prepares (:meth:`Node.prepare`: namespaces, cgroups, containerd on a hard-linked copy of the
image root, no API server needed), then joins it (:meth:`Node.join`: certificates, RBAC,
forwarder, kubelet to Ready, scheduler); ``Node.start()`` does both on a started control plane;
``.stop()`` (or ``with``). Logs in ``run_dir``: ``containerd.log``, ``kubelet.log``,
``kube-scheduler.log``, ``forward*.log``. A start failure raises :class:`NodeError` with the
failing component's log first, then the tails of the others. Each running node is recorded
in ``$MAIL_SELFCHECK_CACHE/node-runs/``; a node whose owner died (SIGKILL) is torn down by the
next start (or ``python -m tests.harness.node cleanup``): its pod processes (by cgroup), shims
(by mount-namespace inode), namespaces, cgroups, host state (below).

Two nodes at once (the tests and ``make demo``; two test runs): everything a node configures
is under its own ``run_dir`` (namespace files, containerd root/state/sockets, runc root, CNI
config and IPAM state, kubelet root, pod logs) or carries its random id (cgroup root,
registry entry); its ports are free ports or addresses of its own network namespace. What
remains shared is named by container/sandbox id and removed at stop: libcni's cache
``/var/lib/cni/results/*-<id>-*``, the kubelet's ``/var/log/containers/*-<id>.log`` links,
the shims' ``/run/containerd/s/<sha256 of the containerd socket path, namespace, id>``.

By hand: ``python -m tests.harness.node up`` runs control plane + scheduler + node in the
foreground and prints ``export KUBECONFIG=...``; Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import controlplane as cpmod
from tests.harness.controlplane import (
    K8S_VERSION, ControlPlane, _build_lock, _is_built, _run_go,
    _set_pdeathsig, build_kubernetes, cache_root, free_port, terminate,
)

REPO = Path(__file__).resolve().parents[2]
NODE_K8S_VERSION = os.environ.get("MAIL_SELFCHECK_NODE_K8S_VERSION", "v1.35.4")
SCHEDULER_VERSION = K8S_VERSION
PAUSE_VERSION = "1"
PAUSE_IMAGE = f"localhost/mail-selfcheck-pause:{PAUSE_VERSION}"
APP_IMAGE = os.environ.get("MAIL_SELFCHECK_NODE_IMAGE", "localhost/mail-selfcheck:dev")
NODE_NAME = "localhost"
NODE_IP = "10.200.0.1"
SERVICE_IP = "10.96.0.1"  # first address of controlplane's --service-cluster-ip-range
POD_SUBNET = "10.244.0.0/24"
BRIDGE = "msc0"
BUILD_IMAGE = REPO / "hack" / "build-image.sh"
CNI_BIN_DIR = Path(os.environ.get("MAIL_SELFCHECK_CNI_BIN_DIR", "/usr/lib/cni"))
SYSTEM_TOOLS = ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "unshare", "nsenter",
                "ip", "mount", "umount", "openssl", "buildah")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
#: What the kubelet's ``setupKernelTunables`` expects; shown to it by bind mounts (see above).
KERNEL_TUNABLES = {"vm/overcommit_memory": "1", "vm/panic_on_oom": "0", "kernel/panic": "10",
                   "kernel/panic_on_oops": "1", "kernel/keys/root_maxkeys": "1000000",
                   "kernel/keys/root_maxbytes": "25000000"}


class NodeError(RuntimeError):
    """The node could not be built or started (message carries the component logs)."""


def _log(msg: str) -> None:
    print(f"[node] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- build
_PAUSE_MAIN = """\
// Generated by tests/harness/node.py: the pod sandbox's process (what registry.k8s.io/pause
// does): hold the pod's namespaces, reap zombies, exit 0 on SIGINT/SIGTERM.
package main

import (
\t"os"
\t"os/signal"
\t"syscall"
)

func main() {
\tsigs := make(chan os.Signal, 8)
\tsignal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
\tfor s := range sigs {
\t\tif s != syscall.SIGCHLD {
\t\t\tos.Exit(0)
\t\t}
\t\tfor {
\t\t\tvar ws syscall.WaitStatus
\t\t\tif pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 || err != nil {
\t\t\t\tbreak
\t\t\t}
\t\t}
\t}
}
"""


def build_pause() -> Path:
    dest = cache_root() / f"pause-{PAUSE_VERSION}"
    if _is_built(dest, ("pause",)):
        return dest
    work = cpmod._fresh_workdir(f"pause-{PAUSE_VERSION}")
    log = work / "build.log"
    (work / "go.mod").write_text("module mail-selfcheck.local/pause\n\ngo 1.21\n")
    (work / "main.go").write_text(_PAUSE_MAIN)
    out = work / "bin"
    out.mkdir()
    _run_go(["build", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "pause"), "."], work, log)
    cpmod._finish(out, dest, {"component": "pause", "version": PAUSE_VERSION})
    shutil.rmtree(work, ignore_errors=True)
    return dest


def _buildah(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(BUILD_IMAGE), "buildah", *args], capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NodeError(f"buildah {' '.join(args)} failed ({proc.returncode}):\n"
                        f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def _image_id(name: str) -> str | None:
    proc = _buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", name,
                    check=False)
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def build_pause_image() -> None:
    if _image_id(PAUSE_IMAGE):
        return
    binary = build_pause() / "pause"
    ctr = _buildah("from", "scratch").stdout.strip()
    try:
        _buildah("copy", "--chmod", "0755", ctr, str(binary), "/pause")
        _buildah("config", "--entrypoint", '["/pause"]', "--cmd", "", "--user", "65535:65535",
                 "--label", "org.opencontainers.image.description=mail-selfcheck test pause",
                 ctr)
        _buildah("commit", "--rm", "--format", "oci", ctr, PAUSE_IMAGE)
    except BaseException:
        _buildah("rm", ctr, check=False)
        raise


def image_context_digest() -> str:
    """sha256 over what ``hack/build-image.sh`` builds from: the Dockerfile, the script and
    the files of the build context (the ``.dockerignore`` allowlist: pyproject.toml,
    constraints.txt, README.md, operator/ without bytecode)."""
    h = hashlib.sha256()
    files = [REPO / "Dockerfile", BUILD_IMAGE, REPO / ".dockerignore", REPO / "pyproject.toml",
             REPO / "constraints.txt", REPO / "README.md"]
    h.update(os.environ.get("BASE_IMAGE", "").encode() + b"\0")  # build-image.sh's override
    files += sorted(f for f in (REPO / "operator").rglob("*") if f.is_file()
                    and "__pycache__" not in f.parts and f.suffix != ".pyc"
                    and not any(part.endswith(".egg-info") for part in f.parts))
    for f in files:
        h.update(str(f.relative_to(REPO)).encode() + b"\0")
        h.update(f.read_bytes() if f.exists() else b"(missing)")
        h.update(b"\0")
    return h.hexdigest()


def _built_id(build_output: str) -> str | None:
    """The image ID in ``buildah bud`` output: its last line (the full ID), else the
    ``--> ID`` line after the final ``COMMIT``."""
    lines = [line.strip() for line in build_output.splitlines() if line.strip()]
    full = [line for line in lines if re.fullmatch(r"[0-9a-f]{64}", line)]
    if full:
        return full[-1]
    commits = [i for i, line in enumerate(lines) if " COMMIT " in f" {line}"]
    for line in lines[commits[-1] + 1:] if commits else []:
        if m := re.fullmatch(r"--> (?:Using cache )?([0-9a-f]{11,64})", line):
            return _image_id(m.group(1))
    return None


def build_app_image() -> str:
    """The ID of the app image built from this working tree: ``hack/build-image.sh`` when no
    build of the same context (:func:`image_context_digest`) has its archive cached yet;
    otherwise nothing (a no-change buildah build still costs ~45 s on the vfs driver).

    The ID comes from this build's own output, never from the tag: another tree (a CI clone
    on the same machine) may retag ``APP_IMAGE`` a moment later. Caller holds ``_build_lock()``."""
    digest = image_context_digest()
    stamp = _images_dir() / f"{_stem(APP_IMAGE)}-context-{digest[:16]}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        image_id = json.loads(stamp.read_text())["image_id"]
        if _archive_path(APP_IMAGE, image_id).is_file():
            _log(f"image {APP_IMAGE} of this working tree is cached ({image_id[:12]}, context {digest[:12]})")
            os.utime(stamp)
            return image_id
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(BUILD_IMAGE)], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "IMAGE": APP_IMAGE})
    if proc.returncode != 0:
        raise NodeError(f"hack/build-image.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    image_id = _built_id(proc.stdout + "\n" + proc.stderr)
    if not image_id:
        raise NodeError(f"no image ID in the output of hack/build-image.sh:\n{proc.stderr[-2000:]}")
    if image_context_digest() == digest:  # else the tree changed during the build: no stamp
        stamp.write_text(json.dumps({"context": digest, "image_id": image_id}) + "\n")
    _prune(list(_images_dir().glob(f"{_stem(APP_IMAGE)}-context-*.json")), lambda p: p, stamp)
    _log(f"image {APP_IMAGE} built in {time.monotonic() - t0:.0f}s ({image_id[:12]})")
    return image_id


def _images_dir() -> Path:
    d = cache_root() / "node-images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


#: Archives and containerd roots of older images are removed once they are neither among the
#: two most recently used nor used in the last ARCHIVE_KEEP_SECONDS (a concurrent run may have
#: been handed one a moment ago and still be reading it): ~1 GB per image.
ARCHIVE_KEEP_SECONDS = 600


def _prune(paths: list[Path], stamp, keep: Path) -> None:
    """Remove ``paths`` (files or directories) but ``keep``, the two most recently used and
    those used in the last ARCHIVE_KEEP_SECONDS; ``stamp(path)`` is the file whose mtime says
    when it was last used."""
    def used(p: Path) -> float:
        try:
            return stamp(p).stat().st_mtime
        except OSError:
            return 0.0
    for old in sorted(paths, key=used, reverse=True)[2:]:
        if old != keep and time.time() - used(old) > ARCHIVE_KEEP_SECONDS:
            with contextlib.suppress(OSError):
                shutil.rmtree(old) if old.is_dir() else old.unlink()


def _archive_path(name: str, image_id: str) -> Path:
    return _images_dir() / f"{_stem(name)}-{image_id[:12]}.tar"


def image_archive(name: str, image_id: str | None = None) -> Path:
    """A ``docker-archive`` of the buildah image ``image_id`` (default: what ``name`` is
    tagged now) named ``name`` inside, cached by image id. Caller holds ``_build_lock()``:
    two runs (the tests and ``make demo``, or two trees) may build at the same time, each gets
    the archive of its own build."""
    image_id = image_id or _image_id(name)
    if not image_id:
        raise NodeError(f"image {name} is not in the buildah storage (run the node build)")
    d, stem = _images_dir(), _stem(name)
    path = _archive_path(name, image_id)
    if not path.is_file():
        tmp = d / f"{path.name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        proc = _buildah("push", "--quiet", image_id, f"docker-archive:{tmp}:{name}", check=False)
        if proc.returncode != 0:
            raise NodeError(f"exporting {name} ({image_id[:12]}) failed; if another tree's build "
                            f"replaced and pruned it meanwhile, run again:\n{proc.stderr[-2000:]}")
        tmp.rename(path)
    os.utime(path)  # in use: see ARCHIVE_KEEP_SECONDS
    _prune(list(d.glob(f"{stem}-*.tar")), lambda p: p, path)
    return path


def check_system() -> None:
    missing = [t for t in SYSTEM_TOOLS if shutil.which(t) is None]
    missing += [f"{CNI_BIN_DIR}/{p}" for p in CNI_PLUGINS if not (CNI_BIN_DIR / p).exists()]
    if missing:
        raise NodeError(f"missing on this machine: {', '.join(missing)} "
                        "(run hack/install-system-deps.sh)")
    if os.geteuid() != 0:
        raise NodeError("the node must run as root")


@dataclass(frozen=True)
class NodeBinaries:
    kubelet: Path
    kube_scheduler: Path
    images: tuple[Path, ...]
    #: :func:`image_root` of ``images``: the node copies it instead of importing them.
    image_root: Path | None = None


def build_lock_busy() -> bool:
    """True when another process holds the cache's build lock (a build is under way)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def build_node(images: bool = True) -> NodeBinaries:
    """Build (or find) everything the node needs. Raises :class:`NodeError`/``BuildError``."""
    check_system()
    t0 = time.monotonic()
    with _build_lock():
        kubelet = build_kubernetes(NODE_K8S_VERSION, ("kubelet",), f"k8s-node-{NODE_K8S_VERSION}")
        sched = build_kubernetes(SCHEDULER_VERSION, ("kube-scheduler",),
                                 f"k8s-scheduler-{SCHEDULER_VERSION}")
        build_pause()
    archives: tuple[Path, ...] = ()
    if images:
        with _build_lock():  # one image build + export at a time per cache (tests and demo)
            # The pause image never changes (PAUSE_VERSION): its archive, once made, is used
            # without asking buildah (whose lock another tree's image build may hold for minutes).
            pause = max(_images_dir().glob(f"{_stem(PAUSE_IMAGE)}-*.tar"), default=None,
                        key=lambda p: p.stat().st_mtime)
            if pause is None:
                build_pause_image()
                pause = image_archive(PAUSE_IMAGE)
            app_id = None
            if os.environ.get("MAIL_SELFCHECK_NODE_IMAGE_BUILD", "1") != "0" or not _image_id(APP_IMAGE):
                app_id = build_app_image()
            else:
                _log(f"MAIL_SELFCHECK_NODE_IMAGE_BUILD=0: using the {APP_IMAGE} already built")
            archives = (pause, image_archive(APP_IMAGE, app_id))
            root = image_root(archives)
    _log(f"node build ready in {time.monotonic() - t0:.0f}s")
    return NodeBinaries(kubelet / "kubelet", sched / "kube-scheduler", archives,
                        root if images else None)


def find_node_binaries() -> NodeBinaries | None:
    """The cached kubelet and kube-scheduler (images not checked), or ``None``."""
    root = cache_root()
    k, s = root / f"k8s-node-{NODE_K8S_VERSION}", root / f"k8s-scheduler-{SCHEDULER_VERSION}"
    if not (_is_built(k, ("kubelet",)) and _is_built(s, ("kube-scheduler",))):
        return None
    return NodeBinaries(k / "kubelet", s / "kube-scheduler", ())


def _containerd_config(d: Path, sock: Path, disabled: tuple[str, ...] = ()) -> str:
    """The top of a containerd 1.6 config whose every path is under ``d``."""
    plugins = ("io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
               "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
               "io.containerd.tracing.processor.v1.otlp", *disabled)
    return f"""\
# Generated by tests/harness/node.py
version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
disabled_plugins = {json.dumps(list(plugins))}
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "info"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"
"""


def _ctr_up(sock: Path) -> tuple[bool, str]:
    p = subprocess.run(["ctr", f"--address={sock}", "version"], capture_output=True, text=True,
                       timeout=10)
    return p.returncode == 0, p.stderr.strip()[-300:]


def image_root(archives: tuple[Path, ...]) -> Path:
    """A containerd root (content store, overlayfs snapshots, metadata) holding ``archives``
    imported and unpacked, cached per archive set in ``node-images/containerd-root-<key>/``.
    A node starts from a hard-linked copy of it (:meth:`Node._copy_image_root`, well under a
    second) instead of importing the images (10-18 s for the app image): layers and blobs are
    never written after they are committed, and each node gets its own copy of the bolt
    databases. Made by a containerd of its own (no CRI, its own mount namespace) under
    ``_build_lock()``."""
    key = hashlib.sha256("\n".join([subprocess.run(
        ["containerd", "--version"], capture_output=True, text=True).stdout.strip(),
        *(a.name for a in archives)]).encode()).hexdigest()[:16]
    dest = _images_dir() / f"containerd-root-{key}"
    if (dest / "READY").is_file():
        os.utime(dest / "READY")
        return dest
    t0 = time.monotonic()
    work = _images_dir() / f"tmp-root-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    sock = work / "c.sock"
    (work / "config.toml").write_text(_containerd_config(work, sock, ("io.containerd.grpc.v1.cri",)))
    log = open(work / "containerd.log", "ab")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "containerd",
                             f"--config={work / 'config.toml'}"], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_set_pdeathsig)
    log.close()
    try:
        end = time.monotonic() + 30
        while not _ctr_up(sock)[0]:
            if proc.poll() is not None or time.monotonic() > end:
                raise NodeError("containerd for the image root did not start:\n"
                                + (work / "containerd.log").read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        for archive in archives:
            p = subprocess.run(["ctr", f"--address={sock}", "--namespace=k8s.io", "images",
                                "import", "--no-unpack=false", str(archive)],
                               capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                raise NodeError(f"ctr images import {archive} failed: {p.stderr[-2000:]}")
    finally:
        terminate(proc, timeout=20)
    shutil.rmtree(dest, ignore_errors=True)
    (work / "root").rename(dest)
    shutil.rmtree(work, ignore_errors=True)
    (dest / "READY").write_text("\n".join(str(a) for a in archives) + "\n")
    _prune(list(_images_dir().glob("containerd-root-*")), lambda p: p / "READY", dest)
    _log(f"containerd image root {dest.name} made in {time.monotonic() - t0:.0f}s")
    return dest


# --------------------------------------------------------------------------- run
def _ns_inode(path: str | Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _pids_in_ns(kind: str, inode: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/{kind}").st_ino == inode:
                    pids.append(int(entry))
    return pids


def _v1_hierarchies() -> list[Path]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup" and parts[1].startswith("/sys/fs/cgroup/"):
            out.append(Path(parts[1]))
    return out


def _all_hierarchies() -> list[Path]:
    """v1 hierarchies plus the hybrid cgroup2 mount (/sys/fs/cgroup/unified), where runc
    also creates the containers' cgroups."""
    out = _v1_hierarchies()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2" and parts[1].startswith("/sys/fs/cgroup/"):
            out.append(Path(parts[1]))
    return out


@dataclass
class Node:
    """kube-scheduler + kubelet + containerd in their own network and mount namespaces.

    ``cp`` must be started (its ``run_dir/pki`` holds the CA used here). After
    :meth:`start`: ``name`` (the Node's name), ``ip`` (its InternalIP, in the node ns),
    ``netns`` (path of the network namespace file: ``nsenter --net=PATH``).
    """

    cp: ControlPlane
    run_dir: Path
    binaries: NodeBinaries | None = None
    start_timeout: float = 180.0
    name: str = NODE_NAME
    ip: str = NODE_IP
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    started_at: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.id = uuid.uuid4().hex[:8]
        self.run_dir = Path(self.run_dir)
        self.ns_dir = self.run_dir / "ns"
        self.netns = self.ns_dir / "net"
        self.mntns = self.ns_dir / "mnt"
        self.cgroup_root = f"/mail-selfcheck-node-{self.id}"
        self.cd_dir = self.run_dir / "containerd"
        self.cd_sock = self.cd_dir / "containerd.sock"
        self.kubelet_port = free_port()
        self._forwarders = 0
        self._net_inode: int | None = None
        self._mnt_inode: int | None = None
        self._import: threading.Thread | None = None
        self._import_error: Exception | None = None

    # ----------------------------------------------------------------- helpers
    def _logpath(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def _tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join(self._logpath(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def logs(self, lines: int = 40, first: str | None = None) -> str:
        """Tails of the component logs; ``first`` (the component that failed) leads, with
        twice as many lines."""
        names = ["containerd", "kubelet", "kube-scheduler", "forward"] + [
            f"forward-{i}" for i in range(1, self._forwarders + 1)]
        if first in names:
            names.remove(first)
            names.insert(0, first)
        return "\n".join(f"--- {n}.log (tail) ---\n{self._tail(n, lines * (2 if n == first else 1))}"
                         for n in names if self._logpath(n).exists())

    def _run(self, argv: list[str], what: str, ns: bool = False, mnt: bool = False,
             check: bool = True, timeout: float = 120, input: str | None = None
             ) -> subprocess.CompletedProcess:
        prefix = []
        if ns or mnt:
            prefix = ["nsenter"] + ([f"--net={self.netns}"] if ns else []) + (
                [f"--mount={self.mntns}"] if mnt else []) + ["--"]
        proc = subprocess.run(prefix + argv, capture_output=True, text=True, timeout=timeout,
                              input=input)
        if check and proc.returncode != 0:
            raise NodeError(f"{what}: {' '.join(prefix + argv)} exited {proc.returncode}: "
                            f"{proc.stderr.strip()[-2000:]} {proc.stdout.strip()[-1000:]}")
        return proc

    def in_netns(self, *argv: str, check: bool = True, timeout: float = 60
                 ) -> subprocess.CompletedProcess:
        """Run a command in the node's network namespace (host mounts)."""
        return self._run(list(argv), "command in the node netns", ns=True, check=check,
                         timeout=timeout)

    def _spawn(self, name: str, argv: list[str], ns: bool = False, mnt: bool = False,
               env: dict[str, str] | None = None) -> subprocess.Popen:
        prefix = []
        if ns or mnt:
            prefix = ["nsenter"] + ([f"--net={self.netns}"] if ns else []) + (
                [f"--mount={self.mntns}"] if mnt else []) + ["--"]
        logf = open(self._logpath(name), "ab")
        proc = subprocess.Popen(prefix + argv, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, cwd=self.run_dir, env=env,
                                start_new_session=True, preexec_fn=_set_pdeathsig)
        logf.close()
        self.procs[name] = proc
        return proc

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise NodeError(f"{name} exited with {proc.returncode} during start-up:\n"
                                f"{self.logs(first=name)}")

    def _wait(self, what: str, predicate, timeout: float | None = None) -> None:
        end = time.monotonic() + (timeout or self.start_timeout)
        last = ""
        while time.monotonic() < end:
            self._check_alive()
            ok, last = predicate()
            if ok:
                return
            time.sleep(0.3)
        raise NodeError(f"timed out after {timeout or self.start_timeout:.0f}s waiting for "
                        f"{what}; last: {last}\n{self.logs()}")

    def _openssl(self, *args: str, cwd: Path) -> None:
        cpmod._openssl(*args, cwd=cwd)

    def _client_cert(self, name: str, subj: str) -> None:
        pki = self.run_dir / "pki"
        ca = self.cp.run_dir / "pki"
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                      "-out", f"{name}.csr", "-subj", subj, cwd=pki)
        (pki / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n"
                                         "keyUsage=digitalSignature,keyEncipherment\n"
                                         "extendedKeyUsage=clientAuth\n")
        self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca / "ca.crt"),
                      "-CAkey", str(ca / "ca.key"), "-CAcreateserial", "-out", f"{name}.crt",
                      "-days", "30", "-extfile", f"{name}.ext", cwd=pki)
        (pki / f"{name}.key").chmod(0o600)

    def _kubeconfig(self, name: str) -> Path:
        pki = self.run_dir / "pki"
        cfg = {"apiVersion": "v1", "kind": "Config",
               "clusters": [{"name": "local", "cluster": {
                   "server": self.cp.server,
                   "certificate-authority": str(self.cp.run_dir / "pki" / "ca.crt")}}],
               "users": [{"name": name, "user": {"client-certificate": str(pki / f"{name}.crt"),
                                                 "client-key": str(pki / f"{name}.key")}}],
               "contexts": [{"name": "local", "context": {"cluster": "local", "user": name}}],
               "current-context": "local"}
        path = self.run_dir / f"{name}.kubeconfig"
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        path.chmod(0o600)
        return path

    # ----------------------------------------------------------------- start
    def start(self) -> "Node":
        """:meth:`prepare` then :meth:`join` (``cp`` must be started; see :func:`start_cluster`
        to start both at once)."""
        return self.prepare().join()

    def prepare(self) -> "Node":
        """The part that needs no API server: namespaces, cgroups, containerd with the images
        (a copy of ``binaries.image_root``; without one, ``binaries.images`` are imported in a
        thread that :meth:`join` waits for: 10-18 s for the app image)."""
        self.started_at = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self._stopping_on_error():
            check_system()
            if self.binaries is None:
                self.binaries = find_node_binaries()
                if self.binaries is None:
                    raise NodeError("node binaries are not built: run `python -m tests.harness.node "
                                    "build` (hack/build-node.sh)")
            if not self.binaries.images:
                raise NodeError("no image archives given (Node(binaries=build_node()))")
            cleanup_stale()
            t0 = time.monotonic()
            self._namespaces()
            self._cgroups()
            if self.binaries.image_root:
                t1 = time.monotonic()
                self._copy_image_root()
                self._mark("image root copy", t1)
            self._containerd()
            self._mark("namespaces+containerd", t0)
            self._import = threading.Thread(
                target=self._import_images if not self.binaries.image_root else lambda: None,
                name=f"import-{self.id}", daemon=True)
            self._import.start()
        return self

    def join(self) -> "Node":
        """Join the started control plane: certificates, RBAC, forwarder, kubelet (waits
        for the Node to be Ready), kube-scheduler; then waits for the image import."""
        with self._stopping_on_error():
            if self._import is None:
                raise NodeError("Node.join() before Node.prepare()")
            t0 = time.monotonic()
            self._certs_and_rbac()
            self._forwarder()
            self._kubelet()
            self._scheduler()
            self._mark("kubelet+scheduler to Ready", t0)
            self._import.join()
            if self._import_error is not None:
                raise NodeError(f"importing the images failed: {self._import_error}\n{self.logs()}")
        _log(f"node {self.name} Ready in {time.monotonic() - self.started_at:.1f}s "
             f"(run dir {self.run_dir}; {self.timings})")
        return self

    @contextlib.contextmanager
    def _stopping_on_error(self):
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def _mark(self, what: str, t0: float) -> None:
        self.timings[what] = round(time.monotonic() - t0, 1)

    def _namespaces(self) -> None:
        self.ns_dir.mkdir(parents=True, exist_ok=True)
        for f in (self.netns, self.mntns):
            f.touch()
        # Persistent namespaces: bind mounts of their nsfs files (released in stop()).
        self._run(["unshare", f"--net={self.netns}", f"--mount={self.mntns}",
                   "--propagation", "private", "true"], "create the node namespaces")
        self._net_inode, self._mnt_inode = _ns_inode(self.netns), _ns_inode(self.mntns)
        self._register()
        ip = ["ip"]
        self._run(ip + ["link", "set", "lo", "up"], "lo up", ns=True)
        for addr in (self.ip, SERVICE_IP):
            self._run(ip + ["addr", "add", f"{addr}/32", "dev", "lo"], f"address {addr}", ns=True)
        # The kubelet's expected kernel tunables, shown only in the node's mount namespace.
        sysctl_dir = self.run_dir / "sysctl"
        sysctl_dir.mkdir(exist_ok=True)
        for key, value in KERNEL_TUNABLES.items():
            fake = sysctl_dir / key.replace("/", "_")
            fake.write_text(value + "\n")
            self._run(["mount", "--bind", "-o", "ro", str(fake), f"/proc/sys/{key}"],
                      f"bind {key}", mnt=True)
        # Pod netns files: containerd 1.6 makes them in /var/run/netns whatever the config says
        # (netns_mounts_under is containerd 1.7+), and a node stopped with live sandboxes left
        # empty cni-* files on the host. A tmpfs of the node's own there keeps them inside the
        # node's mount namespace; they vanish with it.
        Path("/run/netns").mkdir(exist_ok=True)
        self._run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs", "/run/netns"],
                  "tmpfs on /run/netns", mnt=True)
        # The CNI bridge etc. go under the run dir; host-local IPAM state too.
        (self.run_dir / "resolv.conf").write_text(
            "# no DNS in the node: lookups fail at once (pods use IP addresses)\n"
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def _certs_and_rbac(self) -> None:
        pki = self.run_dir / "pki"
        pki.mkdir(exist_ok=True)
        self._client_cert("kubelet", f"/O=system:nodes/CN=system:node:{self.name}")
        self._client_cert("kube-scheduler", "/CN=system:kube-scheduler")
        self.kubelet_kubeconfig = self._kubeconfig("kubelet")
        self.scheduler_kubeconfig = self._kubeconfig("kube-scheduler")
        # --authorization-mode=RBAC (no Node authorizer): bind the kubelet's group to the
        # built-in system:node role, as clusters without the Node authorizer do.
        self.cp.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "mail-selfcheck:nodes"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:node"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                          "name": "system:nodes"}]}))

    def _api_port(self) -> int:
        return int(self.cp.server.rsplit(":", 1)[1])

    def _forward(self, name: str, maps: list[str]) -> None:
        ready = self.run_dir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        self._spawn(name, [sys.executable, "-m", "tests.harness.node_forward",
                           f"--netns={self.netns}", f"--ready={ready}",
                           *[f"--map={m}" for m in maps]], env=env)
        self._wait(f"the forwarder {name}", lambda: (ready.exists(), ""), timeout=20)

    def _forwarder(self) -> None:
        api = self._api_port()
        self._forward("forward", [
            f"ns:127.0.0.1:{api}>host:127.0.0.1:{api}",
            f"ns:{SERVICE_IP}:443>host:127.0.0.1:{api}",
            f"host:127.0.0.1:{self.kubelet_port}>ns:127.0.0.1:{self.kubelet_port}"])

    def expose(self, *ports: int) -> str:
        """Make host ``127.0.0.1:PORT`` reachable from pods as ``NODE_IP:PORT``; returns
        the address pods use (the node IP)."""
        self._forwarders += 1
        self._forward(f"forward-{self._forwarders}",
                      [f"ns:{self.ip}:{p}>host:127.0.0.1:{p}" for p in ports])
        return self.ip

    def _cgroups(self) -> None:
        for h in _v1_hierarchies():
            d = h / self.cgroup_root.lstrip("/")
            d.mkdir(exist_ok=True)
            if (h / "cpuset.cpus").exists():
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (d / f).write_text((h / f).read_text())

    def _containerd(self) -> None:
        d = self.cd_dir
        d.mkdir(exist_ok=True)
        netd = self.run_dir / "cni" / "net.d"
        netd.mkdir(parents=True, exist_ok=True)
        (netd / "10-mail-selfcheck.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "mail-selfcheck",
            "plugins": [{"type": "bridge", "bridge": BRIDGE, "isGateway": True,
                         "ipMasq": False, "hairpinMode": True,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                                  "routes": [{"dst": "0.0.0.0/0"}],
                                  "dataDir": str(self.run_dir / "cni" / "ipam")}}]}, indent=2))
        cfg = _containerd_config(d, self.cd_sock) + f"""\
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under = "{self.run_dir / 'netns'}"  # containerd 1.7+; 1.6: the tmpfs above
  disable_apparmor = true
  # This VM withholds CAP_SYS_RESOURCE: no oom_score_adj below containerd's own.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{shutil.which('runc')}"
        Root = "{self.run_dir / 'runc'}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{netd}"
    max_conf_num = 1
"""
        (d / "config.toml").write_text(cfg)
        self._spawn("containerd", ["containerd", f"--config={d / 'config.toml'}"],
                    ns=True, mnt=True)

        self._wait("containerd's API", lambda: _ctr_up(self.cd_sock), timeout=30)

    def ctr(self, *args: str, check: bool = True, timeout: float = 300
            ) -> subprocess.CompletedProcess:
        """``ctr --namespace k8s.io ARGS`` against the node's containerd."""
        return self._run(["ctr", f"--address={self.cd_sock}", "--namespace=k8s.io", *args],
                         "ctr", check=check, timeout=timeout)

    def _copy_image_root(self) -> None:
        """containerd's root as a hard-linked copy of :func:`image_root` (the bolt databases,
        the only files containerd writes in place, copied)."""
        root = self.cd_dir / "root"
        self.cd_dir.mkdir(exist_ok=True)
        self._run(["cp", "-a", "--link", str(self.binaries.image_root), str(root)],
                  "copy the containerd image root")
        (root / "READY").unlink()
        for db in root.rglob("*.db"):
            tmp = db.with_suffix(".copy")
            shutil.copy2(db, tmp)
            tmp.replace(db)

    def _import_images(self) -> None:
        """In the thread :meth:`prepare` starts (no process is spawned here that must outlive
        it: PR_SET_PDEATHSIG fires when the spawning thread ends)."""
        t0 = time.monotonic()
        try:
            for archive in self.binaries.images:
                self.ctr("images", "import", "--no-unpack=false", str(archive), timeout=600)
        except Exception as e:  # noqa: BLE001 - re-raised by join()
            self._import_error = e
        self._mark("image import", t0)

    def _kubelet(self) -> None:
        kd = self.run_dir / "kubelet"
        kd.mkdir(exist_ok=True)
        pki = self.cp.run_dir / "pki"
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": "0.0.0.0", "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(pki / "ca.crt")}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs", "cgroupRoot": self.cgroup_root,
            "failCgroupV1": False, "failSwapOn": False, "protectKernelDefaults": True,
            "containerRuntimeEndpoint": f"unix://{self.cd_sock}",
            "clusterDomain": "cluster.local", "resolvConf": str(self.run_dir / "resolv.conf"),
            "podLogsDir": str(self.run_dir / "pod-logs"),
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "registerNode": True,
            "nodeStatusUpdateFrequency": "10s", "syncFrequency": "10s",
            "kubeAPIQPS": 50, "kubeAPIBurst": 100, "shutdownGracePeriod": "0s",
            "rotateCertificates": False, "serverTLSBootstrap": False,
        }
        (kd / "config.yaml").write_text(json.dumps(config, indent=2) + "\n")
        self._spawn("kubelet", [
            str(self.binaries.kubelet), f"--config={kd / 'config.yaml'}",
            f"--kubeconfig={self.kubelet_kubeconfig}", f"--hostname-override={self.name}",
            f"--node-ip={self.ip}", f"--root-dir={kd / 'root'}", f"--cert-dir={kd / 'pki'}",
            "--v=2"], ns=True, mnt=True)

        def node_ready():
            p = self.cp.kubectl("get", "node", self.name, "-o", "json", check=False)
            if p.returncode != 0:
                return False, p.stderr.strip()[-300:]
            conds = {c["type"]: c for c in json.loads(p.stdout)["status"].get("conditions", [])}
            ready = conds.get("Ready", {})
            return ready.get("status") == "True", json.dumps(ready)
        self._wait(f"the Node {self.name} to be Ready", node_ready)

    def _scheduler(self) -> None:
        kc = self.scheduler_kubeconfig
        self._spawn("kube-scheduler", [
            str(self.binaries.kube_scheduler), f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--leader-elect=false", "--v=1"])

    # ----------------------------------------------------------------- stop
    def stop(self) -> None:
        """Stop everything (kubelet, pod processes, containerd, shims, scheduler,
        forwarders), release the namespaces, remove the cgroups. Idempotent."""
        if "kubelet" in self.procs:
            terminate(self.procs.pop("kubelet"), timeout=10)
        if "containerd" in self.procs and self._import is not None and self._import.is_alive():
            terminate(self.procs["containerd"], timeout=10)  # ends a running import
            self._import.join(timeout=60)
        if "containerd" in self.procs and self.procs["containerd"].poll() is None:
            # Every task deleted through containerd: the shims exit and clean up after
            # themselves (runc state, sockets under /run/containerd).
            with contextlib.suppress(Exception):
                tasks = self.ctr("tasks", "ls", "-q", check=False, timeout=20).stdout.split()
                if tasks:
                    self.ctr("tasks", "rm", "-f", *tasks, check=False, timeout=60)
        _kill_cgroup_procs(self.cgroup_root)
        if "containerd" in self.procs:
            terminate(self.procs.pop("containerd"), timeout=10)
        _kill_ns_procs(self.mntns, self._mnt_inode, "mnt")
        _kill_ns_procs(self.netns, self._net_inode, "net")
        for name in list(self.procs):
            terminate(self.procs.pop(name), timeout=5)
        _release(self.mntns, self.netns, self.cgroup_root, self.run_dir)
        _registry_file(self.id).unlink(missing_ok=True)

    def _register(self) -> None:
        """Record this run so that a later start cleans it up if this process dies first
        (SIGKILL, a crashed pytest): see :func:`cleanup_stale`."""
        f = _registry_file(self.id)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({
            "owner": os.getpid(), "owner_start": _proc_start(os.getpid()),
            "run_dir": str(self.run_dir), "cgroup_root": self.cgroup_root,
            "mntns": str(self.mntns), "netns": str(self.netns),
            "mnt_inode": self._mnt_inode, "net_inode": self._net_inode}) + "\n")

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_cluster(cp: ControlPlane, node: Node) -> tuple[ControlPlane, Node]:
    """Start the control plane and the node, overlapping what can overlap: the node's
    containerd and image import (:meth:`Node.prepare`) run while etcd and kube-apiserver
    start, then the kubelet joins. On failure both are stopped and the error
    (``ControlPlaneError`` / :class:`NodeError`, with the component logs) is raised."""
    try:
        node.prepare()
        cp.run_dir.mkdir(parents=True, exist_ok=True)
        cp.start()
        node.join()
    except BaseException:
        node.stop()
        cp.stop()
        raise
    return cp, node


def _registry_file(node_id: str) -> Path:
    return cache_root() / "node-runs" / f"{node_id}.json"


def _proc_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _cgroup_dirs(cgroup_root: str) -> list[Path]:
    out = []
    for h in _all_hierarchies():
        root = h / cgroup_root.lstrip("/")
        if root.is_dir():
            out += sorted((p for p in root.rglob("*") if p.is_dir()),
                          key=lambda p: len(p.parts), reverse=True) + [root]
    return out


def _kill_cgroup_procs(cgroup_root: str) -> None:
    """SIGKILL every process in the node's pod cgroups (containers and pause processes)."""
    for _ in range(25):
        pids = set()
        for d in _cgroup_dirs(cgroup_root):
            with contextlib.suppress(OSError):
                pids |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _kill_ns_procs(ns_file: Path, inode: int | None, kind: str) -> None:
    """SIGKILL every process still in the node's namespace (containerd shims): all of them
    were started by this node (the namespace is checked by inode, never by name)."""
    if not inode or _ns_inode(ns_file) != inode:
        return
    sockets = []
    for _ in range(5):
        pids = _pids_in_ns(kind, inode)
        if not pids:
            break
        for pid in pids:
            sockets += _shim_socket(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    for sock in sockets:  # a killed shim leaves its socket behind
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(sock).st_mode):
                os.unlink(sock)


def _shim_socket(pid: int) -> list[str]:
    """The ttrpc socket of a containerd-shim-runc-v2 (containerd 1.6's SocketAddress:
    /run/containerd/s/sha256(<containerd address>/<namespace>/<id>))."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []
    if not argv or not argv[0].endswith("containerd-shim-runc-v2"):
        return []
    opts = dict(zip(argv[1::2], argv[2::2]))
    if not {"-address", "-id", "-namespace"} <= opts.keys():
        return []
    key = f"{opts['-address']}/{opts['-namespace']}/{opts['-id']}".encode()
    return [f"/run/containerd/s/{hashlib.sha256(key).hexdigest()}"]


#: What the kubelet and CNI write outside the node's run dir, named by container/sandbox ID.
CNI_CACHE = Path("/var/lib/cni/results")  # libcni's cache (containerd 1.6 cannot move it)
CONTAINER_LOG_LINKS = Path("/var/log/containers")  # the kubelet's fixed symlink dir


def _forget_host_state(run_dir: Path) -> None:
    """Remove what this node left in the host's shared directories: its sandboxes' CNI
    cache entries and its containers' log symlinks (found by the IDs in its own containerd
    root, so another node's entries are never touched)."""
    cri = run_dir / "containerd" / "root" / "io.containerd.grpc.v1.cri"
    ids = [d.name for kind in ("sandboxes", "containers") if (cri / kind).is_dir()
           for d in (cri / kind).iterdir()]
    for cid in ids:
        for f in [*CNI_CACHE.glob(f"*-{cid}-*"), *CONTAINER_LOG_LINKS.glob(f"*-{cid}.log")]:
            with contextlib.suppress(OSError):
                if f.is_symlink() or f.parent == CNI_CACHE:
                    f.unlink()


def _release(mntns: Path, netns: Path, cgroup_root: str, run_dir: Path) -> None:
    _forget_host_state(run_dir)
    for f in (mntns, netns):
        if f.exists():
            subprocess.run(["umount", "-l", str(f)], capture_output=True)
    _kill_cgroup_procs(cgroup_root)
    for _ in range(10):
        left = []
        for d in _cgroup_dirs(cgroup_root):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(d)
        if not left:
            return
        time.sleep(0.3)


def cleanup_stale() -> int:
    """Tear down nodes whose owning process is gone (killed test runs); returns how many."""
    n = 0
    for f in sorted((cache_root() / "node-runs").glob("*.json")):
        try:
            st = json.loads(f.read_text())
        except (OSError, ValueError):
            f.unlink(missing_ok=True)
            continue
        if _proc_start(st["owner"]) == st.get("owner_start"):
            continue  # still running
        _log(f"cleaning up the stale node of {st['run_dir']}")
        _kill_cgroup_procs(st["cgroup_root"])
        _kill_ns_procs(Path(st["mntns"]), st.get("mnt_inode"), "mnt")
        _kill_ns_procs(Path(st["netns"]), st.get("net_inode"), "net")
        _release(Path(st["mntns"]), Path(st["netns"]), st["cgroup_root"], Path(st["run_dir"]))
        f.unlink(missing_ok=True)
        n += 1
    return n


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.node",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find) the control plane, node binaries, images")
    b.add_argument("--no-images", action="store_true", help="binaries only")
    u = sub.add_parser("up", help="build, then run a control plane + scheduler + this node in "
                                  "the foreground until Ctrl-C / SIGTERM (then stop everything)")
    u.add_argument("--run-dir", help="logs and state (default: a fresh directory under the "
                                      "cache, removed at the end unless --keep)")
    u.add_argument("--keep", action="store_true", help="keep the run directory")
    sub.add_parser("cleanup", help="tear down nodes left by killed runs")
    args = parser.parse_args(argv)
    if args.cmd == "cleanup":
        print(f"cleaned up {cleanup_stale()} stale node(s)")
        return 0
    if args.cmd == "up":
        nb = build_node()
        if args.run_dir:
            run = Path(args.run_dir)
            run.mkdir(parents=True, exist_ok=True)
        else:  # never a fixed directory: two nodes may run at once (tests, make demo)
            cache_root().mkdir(parents=True, exist_ok=True)
            run = Path(tempfile.mkdtemp(prefix="node-run-", dir=cache_root()))
        cp = ControlPlane(cpmod.build_all(), run / "cp", node_agent=False)
        node = Node(cp, run / "node", binaries=nb)

        def _term(*_):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, _term)
        try:
            start_cluster(cp, node)
            print(f"export KUBECONFIG={cp.kubeconfig}\n"
                  f'export PATH="{cp.kubectl_bin.parent}:{cp.helm_bin.parent}:$PATH"\n'
                  f"# node netns: nsenter --net={node.netns} ...; logs in {run}; Ctrl-C stops",
                  flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            node.stop()
            cp.stop()
            if not (args.keep or args.run_dir):
                shutil.rmtree(run, ignore_errors=True)
        return 0
    if args.cmd == "build":
        t0 = time.monotonic()
        cpmod.build_all()
        nb = build_node(images=not args.no_images)
        print(f"kubelet: {nb.kubelet}\nkube-scheduler: {nb.kube_scheduler}")
        for a in nb.images:
            print(f"image archive: {a}")
        print(f"build: {time.monotonic() - t0:.0f}s")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
