"""py-spy over the running services while a bench stage loads them: how busy each one is, and
where its time goes.

Each service is one asyncio process, so the busiest one at overload is the pipeline's slowest
stage. py-spy samples without stopping the process (``--nonblocking``) and, without ``--idle``,
counts only samples where a thread was running Python code: samples / (rate x seconds) is the
share of one core the service used. Self time is attributed to the innermost frame.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = ["ServiceProfile", "profile_services"]

_LINE_NO: Final = re.compile(r":\d+\)$")


@dataclass(slots=True)
class ServiceProfile:
    service: str
    busy: float  # share of one core spent running Python code
    samples: int
    top: list[tuple[str, float]] = field(default_factory=list)  # (function (file), share of samples)
    flamegraph_input: Path | None = None

    def line(self) -> str:
        where = "; ".join(f"{name} {share:.0%}" for name, share in self.top[:4])
        return f"{self.service}: busy {self.busy:.0%} of a core; self time: {where}"


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return found


def _short(frame: str) -> str:
    """``fetch (aiokafka/consumer/fetcher.py:123)`` -> ``fetch (aiokafka/consumer/fetcher.py)``,
    with site-packages and the repository prefix cut off."""
    frame = _LINE_NO.sub(")", frame)
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        head, sep, tail = frame.partition(marker)
        if sep:
            name = head.split(" (", 1)[0]
            return f"{name} ({tail}"
    return frame


def parse_collapsed(text: str, top: int = 8) -> tuple[int, list[tuple[str, float]]]:
    """py-spy's raw (collapsed) output: one ``frame;frame;...;frame count`` line per stack."""
    self_time: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        self_time[_short(stack.rsplit(";", 1)[-1])] += n
    return total, [(name, n / total) for name, n in self_time.most_common(top)] if total else []


async def profile_services(
    pids: dict[str, int], seconds: float, out_dir: Path, rate: int = 100
) -> list[ServiceProfile]:
    """Sample every service in ``pids`` at once for ``seconds``."""
    exe = _py_spy()
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)

    async def one(name: str, pid: int) -> ServiceProfile:
        out = out_dir / f"{name}.collapsed.txt"
        proc = await asyncio.create_subprocess_exec(
            exe, "record", "--pid", str(pid), "--duration", str(round(seconds)), "--rate", str(rate),
            "--format", "raw", "--output", str(out), "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"py-spy on {name} (pid {pid}) failed: {err.decode(errors='replace')[-500:]}")
        samples, top = parse_collapsed(await asyncio.to_thread(out.read_text))
        return ServiceProfile(name, samples / (rate * round(seconds)), samples, top, out)

    return list(await asyncio.gather(*(one(n, p) for n, p in pids.items())))
