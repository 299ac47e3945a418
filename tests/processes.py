"""Ending a driver the way a crash would, in tests that start `imm run` in a session of its own."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil


def kill_driver_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL a driver started in its own session and every process it started (Ray's may sit in
    sessions of their own); returns those still running 30 s later, zombies left out."""
    children = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in children:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=30)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
