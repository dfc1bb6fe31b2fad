"""``rabbitmqctl`` for the alarm and outbox scenarios: resource alarms, their limits, restarts.

The limits are read as the operator left them and put back exactly (see
:func:`memory_watermark` and :func:`disk_free_limit`); every call is bounded and a
missing ``rabbitmqctl`` fails the test loudly (never a skip).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

MEMORY = "memory"
DISK = "disk"


def rabbitmqctl(*args: str, timeout: float = 120.0) -> str:
    """Run ``rabbitmqctl args...`` on the local (shared) broker; its stdout."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to drive the local broker (alarms, restarts)")
    done = subprocess.run(
        ["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=timeout
    )
    return done.stdout


def erl(expression: str) -> str:
    """``rabbitmqctl eval expression`` (an Erlang expression ending in ``.``): its value."""
    return rabbitmqctl("eval", expression).strip()


def alarms() -> set[str]:
    """The resource alarms raised on the broker now: ``{"memory", "disk"}`` or a part of it."""
    text = erl("rabbit_alarm:get_alarms().")
    return set(re.findall(r"\{resource_limit,(\w+),", text))


def memory_watermark() -> list[str]:
    """The memory high watermark now, as ``set_vm_memory_high_watermark`` arguments.

    A fraction (``0.4``) or ``{absolute, Bytes}``: what the operator configured is what
    goes back, not a constant of ours.
    """
    value = erl("vm_memory_monitor:get_vm_memory_high_watermark().").splitlines()[-1]
    if value.startswith("{absolute,"):
        return ["absolute", value.removeprefix("{absolute,").rstrip("}").strip()]
    float(value)  # fails loudly on an answer we do not understand
    return [value]


def disk_free_limit() -> tuple[int, list[str]]:
    """The disk free limit in force (bytes) and the ``set_disk_free_limit`` arguments that
    restore it exactly.

    The disk monitor keeps only bytes; ``set_disk_free_limit`` does not touch the
    application environment. So a limit configured as ``{mem_relative, F}`` is restored
    as ``mem_relative F`` while it still is what that fraction gives (nobody changed it
    at run time), else -- and for every absolute form ("50MB", 50000000) -- as the bytes
    in force, which is the same monitor state.
    """
    limit = int(erl("rabbit_disk_monitor:get_disk_free_limit()."))
    configured = erl(
        "case application:get_env(rabbit, disk_free_limit) of "
        "{ok, {mem_relative, F}} -> {mem_relative, F, "
        "round(F * vm_memory_monitor:get_total_memory())}; Other -> Other end."
    )
    relative = re.fullmatch(r"\{mem_relative,([0-9.eE+-]+),(\d+)\}", configured)
    if relative and int(relative.group(2)) == limit:
        return limit, ["mem_relative", relative.group(1)]
    return limit, [str(limit)]


def disk_free() -> int:
    """Free bytes on the broker's data disk, as its disk monitor last measured them."""
    return int(erl("rabbit_disk_monitor:get_disk_free()."))
