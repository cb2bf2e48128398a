"""What /proc says about processes (Linux): whether one still runs, which of a group still run."""
from __future__ import annotations

from pathlib import Path

EXITED = ("Z", "X")  # a zombie has exited; nothing may reap it here (PID 1 of a container)


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: [state, ppid, pgid, ...]; None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_gone(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is None or fields[0] in EXITED


def live_members(process_group: int) -> list[int]:
    """Processes of the group that have not exited."""
    live = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = stat_fields(entry.name)
        if fields is not None and int(fields[2]) == process_group and fields[0] not in EXITED:
            live.append(int(entry.name))
    return live
