"""Kill a whole process session, as a lost machine ends: Ray puts each worker in its own process group, so a
`killpg` of the job (or of `ray start`) leaves its workers running, still writing the run's files."""

from __future__ import annotations

import os
import signal
import time


def session_members(session: int) -> list[int]:
    """The live (not zombie) processes of session `session` (a leader started with start_new_session: its pid)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone between the listing and the read
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses, so split after the last ')'
        state, _ppid, _pgrp, sid = stat[stat.rindex(")") + 2:].split()[:4]
        if int(sid) == session and state != "Z":
            members.append(int(entry))
    return members


def kill_session(session: int, timeout: float = 60) -> None:
    """SIGKILL every process of `session` and wait until none is left (raises if one outlives `timeout`)."""
    deadline = time.time() + timeout
    while True:
        members = session_members(session)
        if not members:
            return
        if time.time() > deadline:
            raise TimeoutError(f"processes {members} of session {session} outlived SIGKILL for {timeout} s")
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
