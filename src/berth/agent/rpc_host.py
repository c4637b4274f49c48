"""One leased rpc server, in a network namespace of its own where the OS allows it.

ggml-rpc-server has no authentication and listens on TCP. On the agent's own loopback any user of
the agent's machine could connect to it directly, past the relay. So the agent starts it through
this module (`python -m berth.agent.rpc_host`), which first moves itself into a new network
namespace (as root a plain one; otherwise inside a user namespace of its own, where the kernel
allows unprivileged ones), brings that namespace's loopback up and only then runs the server. No
other process on the machine shares that loopback. The agent asks for connections over a socket
pair only it holds: the host connects to the server inside the namespace and passes the connected
socket back (SCM_RIGHTS), so the relay speaks to the server with no extra hop.

Where no namespace can be made (not root, user namespaces disabled), the server listens on the
machine's loopback as before, and the lease says so (`isolation`).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque

from berth.core.procfs import group_alive, listens_on
from berth.engine.redact import child_environment
from berth.runtime.child import drain_output
from berth.runtime.janitor import signal_group
from berth.runtime.relay import Stream

ISOLATED = "network namespace"
READY_TIMEOUT = 20.0
STOP_GRACE = 3.0

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_CONNECT, _CONNECTED, _FAILED = b"c", b"+", b"-"


class RpcServerFailed(Exception):
    """The rpc server exited or did not listen in time (the message says which; output has its lines)."""


# -- inside the host process ---------------------------------------------------------------


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def isolate() -> str:
    """Move this (single-threaded) process into a network namespace of its own, loopback up; say what
    it got: ISOLATED, or "none (why)"."""
    try:
        if os.geteuid() == 0:
            _unshare(_CLONE_NEWNET)
        else:  # a user namespace lends the capability to make (and configure) a network namespace
            uid, gid = os.geteuid(), os.getegid()
            _unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as fh:
                    fh.write(text)
        _loopback_up()
    except OSError as exc:
        return (f"none ({exc.strerror or exc}: the rpc server listens on this machine's loopback, where every "
                "local user can reach it; run the agent as root or allow unprivileged user namespaces)")
    return ISOLATED


def _serve_connections(control: socket.socket, server: subprocess.Popen, port: int) -> None:
    """Hand the agent a connected socket for each request, until it goes away or the server exits."""
    exited = os.pidfd_open(server.pid)
    while True:
        ready, _, _ = select.select([control.fileno(), exited], [], [])
        if exited in ready:
            return
        if not control.recv(1):  # the agent is gone
            return
        try:
            with socket.create_connection(("127.0.0.1", port)) as conn:
                socket.send_fds(control, [_CONNECTED], [conn.fileno()])
        except OSError:
            control.sendall(_FAILED)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m berth.agent.rpc_host")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("server_argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    control = socket.socket(fileno=args.control_fd)
    isolation = isolate()
    argv = args.server_argv[1:] if args.server_argv[:1] == ["--"] else args.server_argv
    server = subprocess.Popen(argv, stdin=subprocess.DEVNULL)  # its output goes where ours does: the agent
    try:
        # the agent gives up after READY_TIMEOUT and stops the whole group
        while not listens_on(server.pid, args.port):  # this very process (another one on the port would not do)
            if server.poll() is not None:
                return
            time.sleep(0.05)
        control.sendall(json.dumps({"pid": server.pid, "isolation": isolation}).encode() + b"\n")
        _serve_connections(control, server, args.port)
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        sys.exit(server.returncode if server.returncode and server.returncode > 0 else 0)


# -- the agent's side ---------------------------------------------------------------------


class RpcHost:
    """The agent's handle on one rpc server started through this module: its output, readiness,
    connections into its namespace, and its stop."""

    def __init__(self, process: asyncio.subprocess.Process, control: socket.socket, port: int) -> None:
        self.process, self.port = process, port
        self.server_pid = 0  # ggml-rpc-server itself, once ready
        self.isolation = ""
        self.output: deque[str] = deque(maxlen=200)
        self._control = control
        self._connecting = asyncio.Lock()  # one request at a time on the socket pair
        self._drain = asyncio.create_task(drain_output(process, lambda line: self.output.append(line.rstrip())))

    @classmethod
    async def spawn(cls, server_argv: list[str], port: int) -> "RpcHost":
        """Start the host with the rpc server's command line (which listens on 127.0.0.1:`port`)."""
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "berth.agent.rpc_host", "--control-fd", str(theirs.fileno()), "--port",
                str(port), "--", *server_argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, pass_fds=(theirs.fileno(),), start_new_session=True,
                env=child_environment(os.environ, ()))  # the agent's key stays with the agent
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return cls(process, ours, port)

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until the server listens; RpcServerFailed when it exits first or takes longer than `timeout`."""
        loop = asyncio.get_running_loop()
        line = b""
        try:
            async with asyncio.timeout(timeout):
                while not line.endswith(b"\n"):
                    chunk = await loop.sock_recv(self._control, 4096)
                    if not chunk:
                        await self.process.wait()
                        await self._drain
                        raise RpcServerFailed(f"the rpc server exited with code {self.process.returncode}: "
                                              + " / ".join(list(self.output)[-5:]))
                    line += chunk
        except TimeoutError:
            raise RpcServerFailed(f"the rpc server did not listen within {timeout:g}s") from None
        ready = json.loads(line)
        self.server_pid, self.isolation = int(ready["pid"]), str(ready["isolation"])

    async def connect(self) -> Stream:
        """A new connection to the rpc server (OSError when there is none to be had)."""
        loop = asyncio.get_running_loop()
        async with self._connecting:
            await loop.sock_sendall(self._control, _CONNECT)
            while True:
                try:
                    message, fds, _, _ = socket.recv_fds(self._control, 1, 1)
                    break
                except BlockingIOError:
                    readable = loop.create_future()
                    loop.add_reader(self._control.fileno(), readable.set_result, None)
                    try:
                        await readable
                    finally:
                        loop.remove_reader(self._control.fileno())
        if message != _CONNECTED or not fds:
            for fd in fds:
                os.close(fd)
            raise ConnectionRefusedError(f"the rpc server on port {self.port} refused a connection")
        return await asyncio.open_connection(sock=socket.socket(fileno=fds[0]))

    async def stop(self) -> None:
        """SIGTERM to the host and its server, SIGKILL after STOP_GRACE for what is left."""
        self._control.close()
        pgid = self.process.pid
        signal_group(pgid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), STOP_GRACE)
        except asyncio.TimeoutError:
            pass
        if await asyncio.to_thread(group_alive, pgid):
            signal_group(pgid, signal.SIGKILL)
            await self.process.wait()
        await self._drain


if __name__ == "__main__":
    main()
