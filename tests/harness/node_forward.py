"""TCP forwarder between the host's network namespace and the node's (``tests.harness.node``).

The node's network namespace has no interface but ``lo`` and the pod bridge, and no route
anywhere: nothing inside it can send a packet to the host's interfaces. The few things that
must cross (the kubelet and pods calling the API server, the API server calling the kubelet
for ``kubectl logs``, pods calling the mail stack) cross here, in user space, as TCP streams
between two sockets: one created in each namespace. A socket belongs to the network namespace
of the thread that created it, so sockets of the node's namespace are created by a short-lived
thread that first calls ``setns(2)`` (the process and its other threads stay on the host).

Mappings, ``SIDE:IP:PORT>SIDE:IP:PORT`` (listen > connect), SIDE ``host`` or ``ns``::

    python -m tests.harness.node_forward --netns RUN/ns/net --ready FILE \\
        --map 'ns:127.0.0.1:6443>host:127.0.0.1:6443' --map 'host:127.0.0.1:10250>ns:127.0.0.1:10250'

Every listener is bound before ``FILE`` is written (``ready`` + newline). SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def in_netns(netns_fd: int, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread that has joined the network namespace ``netns_fd``."""
    box: dict[str, object] = {}

    def run() -> None:
        if _libc.setns(netns_fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            box["err"] = OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")
            return
        try:
            box["val"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["err"] = exc

    t = threading.Thread(target=run, name="setns")
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]  # type: ignore[misc]
    return box["val"]  # type: ignore[return-value]


@dataclass(frozen=True)
class End:
    side: str  # "host" or "ns"
    ip: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "End":
        side, rest = text.split(":", 1)
        ip, port = rest.rsplit(":", 1)
        if side not in ("host", "ns"):
            raise ValueError(f"side must be host or ns: {text!r}")
        return cls(side, ip, int(port))


def parse_map(text: str) -> tuple[End, End]:
    listen, _, connect = text.partition(">")
    return End.parse(listen), End.parse(connect)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            writer.close()


class Forwarder:
    def __init__(self, netns_path: str, maps: list[tuple[End, End]]) -> None:
        self.netns_fd = os.open(netns_path, os.O_RDONLY)
        self.maps = maps

    def _socket(self, side: str) -> socket.socket:
        make = lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # noqa: E731
        return in_netns(self.netns_fd, make) if side == "ns" else make()

    def listener(self, end: End) -> socket.socket:
        sock = self._socket(end.side)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((end.ip, end.port))
        sock.listen(256)
        sock.setblocking(False)
        return sock

    async def _handle(self, target: End, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        sock = self._socket(target.side)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (target.ip, target.port)), 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            r2, w2 = await asyncio.open_connection(sock=sock)
        except (OSError, asyncio.TimeoutError):
            sock.close()
            writer.close()
            return
        await asyncio.gather(_pipe(reader, w2), _pipe(r2, writer))
        for w in (w2, writer):
            w.close()

    async def serve(self, ready_file: str | None) -> None:
        servers = []
        for listen, target in self.maps:
            sock = self.listener(listen)
            servers.append(await asyncio.start_server(
                lambda r, w, t=target: self._handle(t, r, w), sock=sock))
        if ready_file:
            with open(ready_file + ".tmp", "w") as fh:
                fh.write("ready\n")
            os.rename(ready_file + ".tmp", ready_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for s in servers:
            s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.harness.node_forward")
    p.add_argument("--netns", required=True, help="a network namespace file (nsfs bind mount)")
    p.add_argument("--map", action="append", default=[], required=True,
                   help="SIDE:IP:PORT>SIDE:IP:PORT (listen > connect), SIDE host|ns")
    p.add_argument("--ready", help="file written once every listener is bound")
    args = p.parse_args(argv)
    fwd = Forwarder(args.netns, [parse_map(m) for m in args.map])
    asyncio.run(fwd.serve(args.ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
