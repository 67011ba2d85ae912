"""A pytest plugin: processes a test module left running are stopped and named in the summary.

Every process the suite starts inherits TSQP_TEST_SESSION (the test process's pid), also one orphaned when
its parent died. After each module's teardown, such a process still alive after a short grace is killed:
a server or API left spinning would otherwise share the two cores with every later test (a run that
slows by a factor of three no longer fits CI's limit), and the summary names the module that left it.
"""

from __future__ import annotations

import os

import psutil
import pytest

SESSION_VAR = "TSQP_TEST_SESSION"
GRACE_S = 5.0
_left: list[str] = []


def pytest_configure(config):
    os.environ[SESSION_VAR] = str(os.getpid())


def _ours() -> list[psutil.Process]:
    me, tag = os.getpid(), os.environ.get(SESSION_VAR)
    found = []
    for process in psutil.process_iter():
        if process.pid == me:
            continue
        try:
            if process.environ().get(SESSION_VAR) == tag:
                found.append(process)
        except psutil.Error:  # gone, a zombie, or not ours to read
            continue
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if nextitem is not None and nextitem.module is item.module:
        return
    alive = _ours()
    if not alive:
        return
    _, alive = psutil.wait_procs(alive, timeout=GRACE_S)
    for process in alive:
        try:
            command = " ".join(process.cmdline())[:200]
            process.kill()
        except psutil.Error:
            continue
        _left.append(f"{item.path.name}: pid {process.pid}: {command}")


def pytest_terminal_summary(terminalreporter):
    if _left:
        terminalreporter.section("processes left running by a test module (killed)")
        for line in _left:
            terminalreporter.write_line(line)
