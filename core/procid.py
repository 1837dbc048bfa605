"""Who owns a temporary folder: a process identity that outlives the process in a folder's name.

A token ``<machine>-<pid>-<start>`` names one process for good: ``machine`` is a hash of the host
name, the boot id and the pid namespace (two containers on one host, or one host before and after
a reboot, are different machines), ``start`` is the process's start time in clock ticks since boot
(``/proc/<pid>/stat``), so a pid reused by a later process does not pass for the one that died.

On the machine that made the token, :func:`alive` answers exactly (the process exists and started
at that tick); on another machine it cannot know (None), and callers decide from something shared
instead (the job row's attempt, a heartbeat's time).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from functools import lru_cache

TOKEN = re.compile(r"(?P<machine>[0-9a-f]{12})-(?P<pid>\d+)-(?P<start>\d+)")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


@lru_cache
def machine() -> str:
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    raw = "|".join((socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), pidns))
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when there is no such process (or
    only its zombie: a killed process its parent has not reaped yet is gone all the same)."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields after its last ")".
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        if fields[0] in ("Z", "X"):  # field 3, the state
            return None
        return int(fields[19])  # field 22 of stat(5)
    except (IndexError, ValueError):
        return None


def token(pid: int | None = None) -> str:
    """This process's token (or that of ``pid`` on this machine)."""
    pid = os.getpid() if pid is None else pid
    return f"{machine()}-{pid}-{start_ticks(pid) or 0}"


def alive(tok: str) -> bool | None:
    """True or False for a token made on this machine; None for another machine's (or a malformed
    token: nobody can tell)."""
    m = TOKEN.fullmatch(tok)
    if m is None or m["machine"] != machine():
        return None
    return start_ticks(int(m["pid"])) == int(m["start"])
