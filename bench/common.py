"""Running the sample workload for benchmarks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import memsnap.workload

MIB = 1 << 20


class Workload:
    def __init__(self, mib: int):
        self.proc = subprocess.Popen([sys.executable, str(Path(memsnap.workload.__file__)), "--mib", str(mib)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        info = json.loads(self.proc.stdout.readline())
        self.pid, self.base, self.size, self.page = info["pid"], info["base"], info["size"], info["page_size"]
        self.pages = self.size // self.page

    def send(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        if not reply.startswith("ok"):
            raise RuntimeError(f"workload: {reply!r} to {line!r}")
        return reply[3:]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)
