"""Incremental checkpoints of a running process with real CRIU, inside a local node."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

pytestmark = [pytest.mark.nodes, pytest.mark.slow]

NODE = "node-1"
WORKLOAD = "/opt/memsnap/node-agent/memsnap/workload.py"
REGION_HASH = """
import hashlib, json, sys
info = json.load(open(sys.argv[2]))
with open(f"/proc/{sys.argv[1]}/mem", "rb", buffering=0) as m:
    m.seek(info["base"])
    print(hashlib.sha256(m.read(info["size"])).hexdigest())
"""


def sh(command: str, check: bool = True):
    from memsnap import nodes
    result = nodes.run(NODE, ["sh", "-c", command], capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"{command}: {result.stderr}"
    return result


def memsnap(*args: str, check: bool = True):
    from memsnap import nodes
    result = nodes.run(NODE, ["memsnap", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"memsnap {' '.join(args)}: {result.stderr}"
    return result


class NodeWorkload:
    """The sample workload, detached in the node (its own session, no fd from outside)."""

    def __init__(self, tag: str, mib: int = 64, churn: int = 3000, extra: str = ""):
        self.info_path = f"/tmp/{tag}.json"
        out = sh(f"setsid python3 {WORKLOAD} --mib {mib} --churn {churn} {extra} </dev/null "
                 f">{self.info_path} 2>/tmp/{tag}.err & echo $!")
        self.pid = int(out.stdout.strip())
        for _ in range(100):
            if sh(f"cat {self.info_path}").stdout.strip():
                break
            time.sleep(0.05)
        self.info = json.loads(sh(f"cat {self.info_path}").stdout)
        assert self.info["pid"] == self.pid

    def region_hash(self, pid: int | None = None) -> str:
        return sh(f"python3 -c '{REGION_HASH}' {pid or self.pid} {self.info_path}").stdout.strip()

    def alive(self, pid: int | None = None) -> bool:
        state = sh(f"cat /proc/{pid or self.pid}/stat 2>/dev/null | sed 's/.*) //' | cut -d' ' -f1", check=False)
        return state.stdout.strip() not in ("", "Z", "X")

    def stop_churn(self) -> None:
        sh(f"kill -USR1 {self.pid}")
        time.sleep(0.3)

    def kill(self) -> None:
        sh(f"kill -9 {self.pid} 2>/dev/null || true")


@pytest.fixture
def wl(local_nodes, request):
    made = []

    def make(**kwargs):
        w = NodeWorkload(request.node.name.replace("[", "-").replace("]", ""), **kwargs)
        made.append(w)
        return w
    yield make
    for w in made:
        w.kill()
    sh("rm -rf /var/lib/memsnap-test; memsnap untrack")


def checkpoint(pid: int, layer: str, parent: str | None = None, final: bool = False, check: bool = True):
    args = ["checkpoint", "--pid", str(pid), "--dir", f"/var/lib/memsnap-test/{layer}"]
    if parent:
        args += ["--parent", f"/var/lib/memsnap-test/{parent}"]
    if final:
        args.append("--final")
    result = memsnap(*args, check=check)
    return json.loads(result.stdout) if result.returncode == 0 else result


def test_incremental_chain_restores_byte_for_byte(wl):
    w = wl(mib=64, churn=3000)
    full = checkpoint(w.pid, "l1")
    assert full["kind"] == "full" and full["pages"] >= 64 * 256
    time.sleep(0.5)
    l2 = checkpoint(w.pid, "l2", "l1")
    time.sleep(0.5)
    l3 = checkpoint(w.pid, "l3", "l2")
    for layer in (l2, l3):
        assert layer["kind"] == "incremental"
        assert 0 < layer["pages"] < full["pages"] / 4  # ~1500 pages churned per 0.5 s
    w.stop_churn()
    before = w.region_hash()
    final = checkpoint(w.pid, "final", "l3", final=True)
    assert final["kind"] == "final" and final["freeze_seconds"] > 0
    assert final["pages"] < full["pages"] / 4  # the unchanged region stays in the parents
    assert not w.alive()  # stopped once the dump succeeded
    restored = json.loads(memsnap("restore", "--dir", "/var/lib/memsnap-test/final").stdout)
    assert restored["pid"] == w.pid and restored["layers"] == 4
    assert w.alive(restored["pid"])
    assert w.region_hash(restored["pid"]) == before


def test_layers_are_root_only(wl):
    w = wl(mib=4, churn=100)
    checkpoint(w.pid, "l1")
    modes = sh("stat -c '%a %n' /var/lib/memsnap-test/l1 /var/lib/memsnap-test/l1/*").stdout.split("\n")
    assert all(line.split()[0] in ("700", "600") for line in modes if line), modes


def test_restore_refuses_a_broken_chain(wl):
    w = wl(mib=8, churn=500)
    checkpoint(w.pid, "l1")
    checkpoint(w.pid, "l2", "l1")
    checkpoint(w.pid, "final", "l2", final=True)
    sh("cp -a /var/lib/memsnap-test /var/lib/memsnap-test-copy")
    try:
        # a corrupt pages file in a parent
        sh("printf 'X' | dd of=/var/lib/memsnap-test/l1/pages-1.img bs=1 seek=100 conv=notrunc 2>/dev/null")
        bad = memsnap("restore", "--dir", "/var/lib/memsnap-test/final", check=False)
        assert bad.returncode == 1
        assert "/var/lib/memsnap-test/l1/pages-1.img is corrupt" in bad.stderr
        # a missing parent
        sh("rm -rf /var/lib/memsnap-test/l2")
        bad = memsnap("restore", "--dir", "/var/lib/memsnap-test/final", check=False)
        assert bad.returncode == 1 and "does not exist" in bad.stderr
        assert not w.alive()  # nothing was restored
    finally:
        sh("rm -rf /var/lib/memsnap-test-copy")


def test_full_disk_leaves_the_chain_intact_and_loses_nothing(wl):
    w = wl(mib=32, churn=2000)
    checkpoint(w.pid, "l1")
    sh("mkdir -p /var/lib/memsnap-test/small && mount -t tmpfs -o size=256k tmpfs /var/lib/memsnap-test/small")
    try:
        failed = checkpoint(w.pid, "small/l2", "l1", check=False)
        assert failed.returncode == 1
        assert "no space left" in failed.stderr and "the chain is as it was" in failed.stderr
        assert sh("ls -A /var/lib/memsnap-test/small").stdout.strip() == ""
        memsnap("chain", "verify", "--dir", "/var/lib/memsnap-test/l1")
        assert w.alive()
        # the pages that layer could not save go into the next one
        checkpoint(w.pid, "l2", "l1")
        w.stop_churn()
        before = w.region_hash()
        checkpoint(w.pid, "final", "l2", final=True)
        restored = json.loads(memsnap("restore", "--dir", "/var/lib/memsnap-test/final").stdout)
        assert w.region_hash(restored["pid"]) == before
    finally:
        sh("umount /var/lib/memsnap-test/small", check=False)


def test_failed_final_dump_leaves_the_workload_running(wl):
    w = wl(mib=8, churn=500, extra="--tcp")  # CRIU refuses established TCP connections by default
    checkpoint(w.pid, "l1")
    failed = checkpoint(w.pid, "final", "l1", final=True, check=False)
    assert failed.returncode == 1
    assert "criu dump failed" in failed.stderr
    assert w.alive()
    assert sh("ls /var/lib/memsnap-test").stdout.split() == ["l1"]
    first = w.region_hash()
    time.sleep(0.3)
    assert w.region_hash() != first  # still churning: thawed, not frozen


def test_target_dying_mid_checkpoint(wl):
    """Killed while its first (1 GiB) layer is being copied: a clear error, no partial layer."""
    from memsnap import nodes
    w = wl(mib=1024, churn=100)
    proc = nodes.popen(NODE, ["memsnap", "checkpoint", "--pid", str(w.pid), "--dir", "/var/lib/memsnap-test/l1"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.6)
    w.kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert f"pid {w.pid}" in err and "Traceback" not in err
    assert sh("ls -A /var/lib/memsnap-test 2>/dev/null || true").stdout.split() == []


def test_flattened_and_pruned_chains_stay_restorable(wl):
    w = wl(mib=16, churn=1000)
    checkpoint(w.pid, "l1")
    for i in (2, 3, 4):
        time.sleep(0.3)
        checkpoint(w.pid, f"l{i}", f"l{i - 1}")
    w.stop_churn()
    before = w.region_hash()
    checkpoint(w.pid, "final", "l4", final=True)
    base = "/var/lib/memsnap-test"
    flat = json.loads(memsnap("chain", "flatten", "--dir", f"{base}/final", "--to", f"{base}/flat").stdout)
    assert flat["dir"] == f"{base}/flat"
    layers = [json.loads(line) for line in memsnap("chain", "show", "--dir", f"{base}/flat").stdout.splitlines()]
    assert len(layers) == 1 and layers[0]["kind"] == "final"
    removed = json.loads(memsnap("chain", "prune", "--dir", f"{base}/final", "--keep", "2").stdout)["removed"]
    assert sorted(removed) == [f"{base}/l1", f"{base}/l2", f"{base}/l3"]
    layers = [json.loads(line) for line in memsnap("chain", "show", "--dir", f"{base}/final").stdout.splitlines()]
    assert [layer["dir"] for layer in layers] == [f"{base}/final", f"{base}/l4"]
    memsnap("chain", "verify", "--dir", f"{base}/final")
    restored = json.loads(memsnap("restore", "--dir", f"{base}/final").stdout)
    assert w.region_hash(restored["pid"]) == before
    sh(f"kill -9 {restored['pid']}")
    time.sleep(0.2)
    restored = json.loads(memsnap("restore", "--dir", f"{base}/flat").stdout)
    assert w.region_hash(restored["pid"]) == before


def test_engine_choice_is_reported(wl):
    w = wl(mib=4, churn=100)
    layer = checkpoint(w.pid, "l1")
    assert layer["engine"] == "memsnap"
    criu_own = memsnap("checkpoint", "--pid", str(w.pid), "--dir", "/var/lib/memsnap-test/c1",
                       "--engine", "criu", check=False)
    # This kernel has no soft-dirty: CRIU's own incremental dumps are refused, with the reason.
    assert criu_own.returncode == 2
    assert "need soft-dirty tracking" in criu_own.stderr
