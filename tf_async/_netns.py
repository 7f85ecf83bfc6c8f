"""Private cluster networks: a Linux network namespace whose only interface is loopback.

TensorFlow's gRPC server listens on ``0.0.0.0:port`` (``grpc_server_lib.cc``),
without authentication, and runs any op a client sends; tf_async's clusters on
one machine therefore run in a network namespace of their own, where the only
interface is ``lo``: the tasks reach each other on localhost, and nothing
outside the namespace (other machines, other users, other containers) can
reach them.

* :func:`isolate` moves the calling process into a new network namespace
  (``unshare(CLONE_NEWNET)`` as root, or inside a new user namespace where
  unprivileged user namespaces are allowed) and brings ``lo`` up.
* ``python .../tf_async/_netns.py hold`` is the namespace's holder process
  (the launcher starts one per launch; it lives until its stdin closes);
  ``python .../tf_async/_netns.py exec PID -- ARGV`` joins PID's namespaces
  and execs ARGV (how every process of the cluster is started).

Only the standard library (``ctypes`` for ``unshare``/``setns``, an ioctl for
``lo``): no ``ip``/``unshare``/``nsenter`` binaries needed. Linux only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
from typing import List, Optional

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


class IsolationError(OSError):
    """The OS does not allow a private network namespace here."""


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _call(name: str, *args) -> None:
    if getattr(_libc(), name)(*args) != 0:
        code = ctypes.get_errno()
        raise IsolationError(code, f"{name}: {os.strerror(code)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _bring_up_loopback() -> None:
    import fcntl  # POSIX only: imported where it is used

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | _IFF_UP))


def isolate() -> bool:
    """Moves this process into a new network namespace with only ``lo`` (up).

    Returns whether a user namespace was needed (not root). As root the
    namespace is made directly; otherwise a user namespace (mapping this
    user to root inside it) comes first, which Linux allows only in a
    single-threaded process and where unprivileged user namespaces are on.
    Raises :class:`IsolationError` with the reason when neither works.
    A network namespace belongs to a thread: threads that already exist stay
    on the host network (:func:`threads_outside`); threads started later
    inherit the new one.
    """
    if not sys.platform.startswith("linux"):
        raise IsolationError(errno.ENOSYS, f"network namespaces need Linux ({sys.platform})")
    try:
        _call("unshare", CLONE_NEWNET)
        user_namespace = False
    except IsolationError as error:
        if error.errno != errno.EPERM:
            raise
        uid, gid = os.getuid(), os.getgid()
        try:
            _call("unshare", CLONE_NEWUSER | CLONE_NEWNET)
        except IsolationError as user_error:
            raise IsolationError(
                user_error.errno,
                "not root, and no unprivileged user namespace "
                f"({user_error.strerror}; a multi-threaded process cannot make one)",
            ) from None
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
        user_namespace = True
    _bring_up_loopback()
    return user_namespace


def namespace_id(pid: str = "self", kind: str = "net") -> str:
    """``net:[4026531840]``-style identity of a process's namespace."""
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def threads_outside(namespace: Optional[str] = None) -> List[int]:
    """Thread ids of this process not in ``namespace`` (default: this thread's)."""
    namespace = namespace or namespace_id("thread-self")
    outside = []
    for tid in os.listdir("/proc/self/task"):
        try:
            if os.readlink(f"/proc/self/task/{tid}/ns/net") != namespace:
                outside.append(int(tid))
        except OSError:  # the thread ended meanwhile
            continue
    return outside


def interfaces() -> List[str]:
    """Network interfaces visible to this process (``/proc/self/net/dev``)."""
    with open("/proc/self/net/dev") as f:
        return [line.split(":")[0].strip() for line in f.readlines()[2:]]


def enter(pid: int) -> None:
    """Joins the user namespace (if any) and the network namespace of ``pid``.

    Single-threaded callers only (joining a user namespace requires it).
    """
    if namespace_id(str(pid), "user") != namespace_id("self", "user"):
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
        try:
            _call("setns", fd, CLONE_NEWUSER)
        finally:
            os.close(fd)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        _call("setns", fd, CLONE_NEWNET)
    finally:
        os.close(fd)


def command(python: str, *args: str) -> List[str]:
    """``python this_file ARGS``: the holder / exec helper as a process. Run as
    a file (standard library only), so it needs no ``PYTHONPATH`` and leaves
    the environment of the command it execs untouched."""
    return [python, os.path.abspath(__file__), *args]


def _main(argv: List[str]) -> int:
    if argv[:1] == ["hold"]:
        try:
            user_namespace = isolate()
        except IsolationError as error:
            print(f"unavailable {error.strerror}", flush=True)
            return 1
        print(f"ready {os.getpid()} {'user' if user_namespace else 'root'}", flush=True)
        sys.stdin.read()  # hold the namespace until the launcher closes stdin
        return 0
    if argv[:1] == ["exec"] and len(argv) >= 4 and argv[2] == "--":
        enter(int(argv[1]))
        os.execvp(argv[3], argv[3:])
    print("usage: _netns.py hold | exec PID -- ARGV", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
