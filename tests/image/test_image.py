"""The container image, built for real from ./Dockerfile and run with buildah.

No Docker engine and no registry: ``hack/build-image.sh`` builds the Dockerfile daemonless
(``buildah bud --isolation chroot --pull=never``) on a Debian bookworm base made with
debootstrap (the local stand-in for ``python:3.12-slim``), both cached in
``~/.cache/mail-selfcheck/images``. The tests then check the image configuration (non-root
numeric user, entrypoint), that the final stage carries no build tooling, run
``mail-selfcheck --help`` / ``crd`` in it, and run a real probe inside it (``buildah run``,
host network) against the real Postfix + Dovecot stack (``mail_stack`` fixture,
``tests/harness/mail_fixtures.py``), checking that the probe wrote nothing into the image's
filesystem (read-only root FS).

If buildah cannot build or run here the tests FAIL with the exact command and its output;
they are never skipped.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "hack" / "build-image.sh"
IMAGE = "localhost/mail-selfcheck:dev"
UID = 65532
CONTAINER_PREFIX = "mail-selfcheck-image-test-"
#: Uncompressed size budget: base (~160 MB debootstrap / ~125 MB python:3.12-slim) + the
#: venv (~170 MB, two thirds of it the kubernetes client). A compiler or a second copy of
#: the dependencies would blow it.
MAX_IMAGE_BYTES = 420 * 1000 * 1000

pytestmark = [pytest.mark.image, pytest.mark.timeout(1800)]


def _run(argv: list[str], what: str, timeout: float = 300, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    """Run a command; on failure fail the test with the exact command line and its output."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, **(env or {})})
    except FileNotFoundError as exc:
        pytest.fail(f"{what}: cannot execute {shlex.join(argv)}: {exc}", pytrace=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{what}: timed out after {timeout} s: {shlex.join(argv)}\n"
                    f"--- stderr ---\n{(exc.stderr or b'')[-4000:]!r}", pytrace=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}): {shlex.join(argv)}\n"
                    f"--- stdout (tail) ---\n{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-5000:]}",
                    pytrace=False)
    return proc


def buildah(*args: str, what: str = "buildah", timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """buildah on the build script's storage (``hack/build-image.sh buildah ARGS``)."""
    return _run(["bash", str(BUILD_SCRIPT), "buildah", *args], what=what, timeout=timeout, check=check)


def _rootfs_snapshot(mountpoint: Path) -> dict[str, tuple[int, int, int]]:
    """path -> (mode, size, mtime_ns) of everything in a mounted root filesystem."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(mountpoint):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            snap[os.path.relpath(path, mountpoint)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return snap


@pytest.fixture(scope="module")
def image() -> dict:
    """Build the image (cached base and layers); return its ``buildah inspect`` JSON."""
    t0 = time.monotonic()
    proc = _run(["bash", str(BUILD_SCRIPT)], what="image build (hack/build-image.sh)", timeout=1700,
                env={"IMAGE": IMAGE})
    elapsed = time.monotonic() - t0
    print(f"\nimage build: {elapsed:.0f} s\n{proc.stderr[-1500:]}")
    return json.loads(buildah("inspect", "--type", "image", IMAGE, what="buildah inspect").stdout)


@pytest.fixture(scope="module")
def container(image) -> str:
    """A working container of the image for ``buildah run`` (removed afterwards)."""
    listed = buildah("containers", "--format", "{{.ContainerName}}", what="buildah containers").stdout.split()
    for stale in (name for name in listed if name.startswith(CONTAINER_PREFIX)):
        pid = stale[len(CONTAINER_PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():  # left by a killed test run
            buildah("rm", stale, what="remove a stale test container", check=False)
    name = f"{CONTAINER_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    buildah("from", "--pull=never", "--name", name, IMAGE, what="buildah from")
    try:
        yield name
    finally:
        buildah("rm", name, what="buildah rm", check=False)


def run_in(container: str, *command: str, env: dict[str, str] | None = None,
           volumes: tuple[str, ...] = (), check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    """``buildah run`` with the image's own user, on the host network."""
    args = ["run", "--isolation", "chroot", "--network", "host"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    for volume in volumes:
        args += ["--volume", volume]
    return buildah(*args, container, "--", *command, what="buildah run " + shlex.join(command),
                   timeout=timeout, check=check)


def test_image_config_and_size(image, pytestconfig, tmp_path):
    config = image["OCIv1"]["config"]
    user = config.get("User", "")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"user must be a non-root numeric uid, got {user!r}"
    assert int(uid) == UID and gid == str(UID), user
    assert config["Entrypoint"] == ["mail-selfcheck"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert not any(key.startswith("PIP_") for key in env), "build-time pip settings leaked into the image"

    layers = json.loads(image["Manifest"])["layers"]
    size = sum(layer["size"] for layer in layers)  # uncompressed tar sizes in local storage
    sizes = ", ".join(f"{layer['size'] / 1e6:.1f}" for layer in layers)
    # What a registry would store and a node pull: gzip layers, as `buildah push` writes them.
    buildah("push", "--quiet", "--compression-format", "gzip", IMAGE, f"oci:{tmp_path / 'oci'}:dev",
            what="buildah push to an OCI layout")
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    pushed = json.loads((tmp_path / "oci" / "blobs" / "sha256" / digest).read_text())["layers"]
    compressed = sum(layer["size"] for layer in pushed)
    with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\nimage {IMAGE}: {size / 1e6:.1f} MB uncompressed ({sizes} MB layers), "
              f"{compressed / 1e6:.1f} MB compressed (gzip), "
              f"FROM {config.get('Labels', {}).get('org.opencontainers.image.base.name', '?')}")
    assert size < MAX_IMAGE_BYTES, f"image is {size / 1e6:.0f} MB"


def test_final_stage_has_no_build_tools(container):
    proc = run_in(container, "sh", "-c",
                  "id -u; id -g; ls /opt; command -v gcc cc make pip pip3 || true; "
                  "python3 -c 'import importlib.util as u; print([m for m in (\"pip\", \"setuptools\", \"wheel\") "
                  "if u.find_spec(m)])'")
    uid, gid, opt, *rest = proc.stdout.splitlines()
    assert (uid, gid) == (str(UID), str(UID)), "the image's USER is not applied"
    assert opt == "venv", f"/opt holds {opt!r}: the builder's tool venv leaked into the final stage"
    assert rest == ["[]"], f"build tools in the final stage: {rest}"


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_installed_distributions_are_the_pinned_ones(container):
    proc = run_in(container, "python3", "-c",
                  "import importlib.metadata as m\n"
                  "for d in m.distributions(): print(d.metadata['Name'], d.version)")
    installed = {name.lower().replace("_", "-"): version
                 for name, version in (line.split() for line in proc.stdout.splitlines())}
    with open(ROOT / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert installed.pop("mail-selfcheck", None) == version, "the project itself is not installed"
    pins = _constraints()
    unpinned = {name: version for name, version in installed.items() if pins.get(name) != version}
    assert unpinned == {}, f"installed in the image but not at the constraints.txt version: {unpinned}"
    build_backend = {"setuptools", "wheel", "packaging"}
    missing = set(pins) - set(installed) - build_backend
    assert missing == set(), f"pinned runtime dependencies missing from the image: {missing}"


def test_help_and_crd(container):
    helped = run_in(container, "mail-selfcheck", "--help")
    for command in ("run", "operator", "crd"):
        assert command in helped.stdout
    crd = run_in(container, "mail-selfcheck", "crd")
    assert "kind: CustomResourceDefinition" in crd.stdout
    assert "mailselfchecks" in crd.stdout


def test_probe_in_image_against_real_mail_stack(container, mail_stack, tmp_path):
    stack = mail_stack  # the session's Postfix + Dovecot (tests/harness/mail_fixtures.py), reset
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # written by the image's non-root user
    volumes = (f"{out}:/out",)
    # Mount points and buildah's own files (hosts, resolv.conf) appear on a first run; what a
    # second run of `true` still changes (buildah's /run/.containerenv) is buildah's noise.
    run_in(container, "true", volumes=volumes)
    mountpoint = Path(buildah("mount", container, what="buildah mount").stdout.strip())
    baseline = _rootfs_snapshot(mountpoint)
    run_in(container, "true", volumes=volumes)
    before = _rootfs_snapshot(mountpoint)
    noise = {path for path in baseline.keys() | before.keys() if baseline.get(path) != before.get(path)}

    env = stack.probe_env(TLS_CA_FILE=None, SECRET="img-" + secrets.token_hex(6))
    env["MESSAGES_SELFCHECK_TLS_CA_PEM"] = Path(stack.ca_file).read_text()
    proc = run_in(container, "mail-selfcheck", "run", "--json", "--log-format", "json",
                  "--result-file", "/out/result.json", env=env, volumes=volumes)

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["success"] is True, f"probe in the image failed: {result}\n{proc.stderr[-3000:]}"
    assert result["error"] is None and result["error_class"] is None
    assert result["send_time"] > 0 and result["reception_time"] >= 0
    assert result["folder"] == "INBOX" and result["message_id"]
    assert json.loads((out / "result.json").read_text()) == result
    assert stack.messages("receiver") == [], "the probe did not clean up its message"
    for secret in (env["MESSAGES_SELFCHECK_SECRET"], env["MESSAGES_SELFCHECK_SMTP_PASSWORD"]):
        assert secret not in proc.stdout + proc.stderr

    after = _rootfs_snapshot(mountpoint)
    buildah("umount", container, what="buildah umount")
    changed = sorted(path for path in before.keys() | after.keys()
                     if before.get(path) != after.get(path) and path not in noise)
    assert changed == [], f"the probe wrote into the image's filesystem (not read-only safe): {changed[:20]}"
