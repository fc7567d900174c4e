"""The checkpoint half of `memsnap demo`: a workload in node-1, pre-copy layers while it runs,
a final layer, a restore, and a byte-for-byte check of its memory."""
from __future__ import annotations

import json
import time

from . import nodes

NODE = "node-1"
WORKLOAD = "/opt/memsnap/node-agent/memsnap/workload.py"
DIR = "/var/lib/memsnap-demo"
MIB = 1 << 20
REGION_HASH = ("import hashlib,json,sys;i=json.load(open(sys.argv[2]));m=open(f'/proc/{sys.argv[1]}/mem','rb',0);"
               "m.seek(i['base']);print(hashlib.sha256(m.read(i['size'])).hexdigest())")


def sh(*argv: str) -> str:
    result = nodes.run(NODE, list(argv), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout.strip()


def checkpoint(pid: int, name: str, parent: str | None = None, final: bool = False) -> dict:
    args = ["memsnap", "checkpoint", "--pid", str(pid), "--dir", f"{DIR}/{name}"]
    args += ["--parent", f"{DIR}/{parent}"] if parent else []
    args += ["--final"] if final else []
    layer = json.loads(sh(*args))
    extra = f", froze the workload for {layer['freeze_seconds'] * 1000:.0f} ms" if final else ""
    print(f"  {name:6} {layer['kind']:12} {layer['bytes'] / MIB:7.1f} MiB of "
          f"{layer['described_pages'] * 4096 / MIB:6.1f} MiB described{extra}")
    return layer


def run() -> int:
    print("\n== 2. incremental checkpoints in a local node (CRIU inside a Debian 13 root)")
    were_up = {n.name for n in nodes.list_nodes() if n.running}
    print("  bringing up node-1 (the first time builds the node image, about a minute)…")
    nodes.up(count=1)
    try:
        return _chain()
    finally:
        sh("sh", "-c", f"rm -rf {DIR}; pkill -f '[w]orkload.py' || true")
        if NODE not in were_up:
            nodes.down([NODE])


def _chain() -> int:
    pid = int(sh("sh", "-c", f"setsid python3 {WORKLOAD} --mib 256 --churn 1300 </dev/null "
                             ">/tmp/demo.json 2>&1 & echo $!"))
    while not sh("cat", "/tmp/demo.json"):
        time.sleep(0.1)
    print(f"  workload pid {pid} in {NODE}: 256 MiB, rewriting ~2 % of it per second")
    checkpoint(pid, "l1")
    for i in (2, 3):
        time.sleep(1.0)
        checkpoint(pid, f"l{i}", f"l{i - 1}")
    sh("kill", "-USR1", str(pid))  # stop writing, so the memory to compare holds still
    time.sleep(0.3)
    before = sh("python3", "-c", REGION_HASH, str(pid), "/tmp/demo.json")
    checkpoint(pid, "final", "l3", final=True)
    restored = json.loads(sh("memsnap", "restore", "--dir", f"{DIR}/final"))
    after = sh("python3", "-c", REGION_HASH, str(restored["pid"]), "/tmp/demo.json")
    same = before == after
    print(f"  restored as pid {restored['pid']} from {restored['layers']} layers; memory "
          f"{'identical, byte for byte' if same else 'DIFFERS'} (sha256 {after[:16]}…)")
    return 0 if same else 1
