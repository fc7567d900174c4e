"""The final layer with memsnap's CRIU: CRIU itself writes only the pages written since the
last layer (its dirty bits come from the uffd-wp protection memsnap's tracker keeps), and the
chain restores byte for byte."""
from __future__ import annotations

import json
import time

import pytest

from test_checkpoint import checkpoint, memsnap, sh, wl  # noqa: F401  (wl is a fixture)

pytestmark = [pytest.mark.nodes, pytest.mark.slow]

BASE = "/var/lib/memsnap-test"
# Writes one distinct byte into each of the given pages of the workload's region, from
# outside (through /proc/PID/mem, a write the kernel makes like the process would).
POKE = """
import json, sys
info = json.load(open(sys.argv[2]))
with open(f"/proc/{sys.argv[1]}/mem", "r+b", buffering=0) as m:
    for i, page in enumerate(json.loads(sys.argv[3])):
        m.seek(info["base"] + page * info["page_size"] + 7)
        m.write(bytes([(i % 250) + 1]))
"""
# madvise(ADVICE) on COUNT pages of the region from FIRST, inside the workload (injected).
# MADV_DONTNEED discards: the pages read as zeros from then on, and a restore must not bring
# their old data back.
ADVISE = """
import json, sys
from memsnap import remote
info = json.load(open(sys.argv[2]))
with remote.Session(int(sys.argv[1])) as s:
    addr = info["base"] + int(sys.argv[3]) * info["page_size"]
    assert s.call("madvise", addr, int(sys.argv[4]) * info["page_size"], int(sys.argv[5])) == 0
"""
# Region pages (numbers) that a layer's pagemap holds data for.
HELD = """
import json, sys, pycriu.images
info = json.load(open(sys.argv[2]))
base, size, ps = info["base"], info["size"], info["page_size"]
head, *entries = pycriu.images.load(open(sys.argv[3] + f"/pagemap-{sys.argv[1]}.img", "rb"))["entries"]
held = []
for e in entries:
    if e.get("flags", 4) & 4:
        held += [(e["vaddr"] - base) // ps + i for i in range(e["nr_pages"])
                 if base <= e["vaddr"] + i * ps < base + size]
print(json.dumps(sorted(held)))
"""
# Pages a layer's pagemap holds data for (PE_PRESENT), and pages it describes (with PE_PARENT).
COUNTS = """
import glob, json, sys, pycriu.images
held = described = 0
for path in glob.glob(sys.argv[1] + "/pagemap-*.img"):
    head, *entries = pycriu.images.load(open(path, "rb"))["entries"]
    held += sum(e["nr_pages"] for e in entries if e.get("flags", 4) & 4)
    described += sum(e["nr_pages"] for e in entries if e.get("flags", 4) & 5)
print(json.dumps([held, described]))
"""
# final.write with the tracker's hand-over broken (fault injection: the rest is real), while
# CRIU waits in its pre-dump action for the tree to be frozen and handed over.
BROKEN_HAND_OVER = """
import sys
from pathlib import Path
from memsnap.checkpoint import final
from memsnap.tracking.uffd_wp import UffdWp
def broken(self, holds):
    raise RuntimeError("hand-over broke")
UffdWp.hand_over = broken
try:
    final.write(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
except RuntimeError as exc:
    print(exc)
"""
MADV_DONTNEED, MADV_DONTFORK = 4, 10


def poke(w, pages: list[int]) -> None:
    sh(f"python3 -c '{POKE}' {w.pid} {w.info_path} '{json.dumps(pages)}'")


def held_pages(w, layer: str) -> list[int]:
    return json.loads(sh(f"python3 -c '{HELD}' {w.pid} {w.info_path} {BASE}/{layer}").stdout)


def test_criu_writes_only_the_pages_written_since_the_last_layer(wl):
    w = wl(mib=64, churn=2000)
    full = checkpoint(w.pid, "l1")
    time.sleep(0.5)
    checkpoint(w.pid, "l2", "l1")
    w.stop_churn()
    checkpoint(w.pid, "l3", "l2")  # the last churned pages
    written = sorted({(i * 37) % 16384 for i in range(300)})  # pages 0..11063
    poke(w, written)
    sh(f"python3 -c '{ADVISE}' {w.pid} {w.info_path} 16000 64 {MADV_DONTNEED}")  # held by the chain until now
    before = w.region_hash()
    final = checkpoint(w.pid, "final", "l3", final=True)
    assert final["kind"] == "final"
    manifest = json.loads(sh(f"cat {BASE}/final/memsnap-layer.json").stdout)
    assert "--track-mem-uffd" in manifest["how"]
    assert held_pages(w, "final") == written  # exactly the pages written since l3, in the region
    assert manifest["dirty_pages"]["criu_in_tracked"] == manifest["dirty_pages"]["tracker"]
    # what the manifest says (from CRIU's stats) is what the pagemaps hold
    assert json.loads(sh(f"python3 -c '{COUNTS}' {BASE}/final").stdout) == [manifest["pages"], manifest["described_pages"]]
    assert final["pages"] < full["pages"] / 20
    assert set(manifest["phases"]) >= {"freeze", "collect", "criu state dump", "memory delta"}
    assert not w.alive()
    restored = json.loads(memsnap("restore", "--dir", f"{BASE}/final").stdout)
    assert w.alive(restored["pid"])
    assert w.region_hash(restored["pid"]) == before


def test_a_chain_without_parked_tracking_falls_back_to_a_whole_dump(wl):
    w = wl(mib=16, churn=500)
    checkpoint(w.pid, "l1")
    sh("memsnap untrack --pid %d" % w.pid)  # the chain's tracking is gone: nothing says what changed
    w.stop_churn()
    before = w.region_hash()
    checkpoint(w.pid, "final", "l1", final=True)
    manifest = json.loads(sh(f"cat {BASE}/final/memsnap-layer.json").stdout)
    assert "--track-mem-uffd" not in manifest["how"]
    restored = json.loads(memsnap("restore", "--dir", f"{BASE}/final").stdout)
    assert w.region_hash(restored["pid"]) == before


def test_a_failed_hand_over_stops_the_waiting_criu_and_thaws_the_workload(wl):
    """CRIU starts before the freeze and waits in its pre-dump action: if the freeze or the
    hand-over fails, it must end without touching the tasks, and the workload run on."""
    w = wl(mib=16, churn=500)
    checkpoint(w.pid, "l1")
    out = sh(f"python3 -c '{BROKEN_HAND_OVER}' {w.pid} {BASE}/final {BASE}/l1").stdout
    assert "hand-over broke" in out
    assert sh("pgrep -x criu", check=False).returncode == 1  # no CRIU left waiting
    assert sh("ls /tmp").stdout.count("memsnap-criu-") == 0  # its handshake FIFOs are gone
    assert sh(f"ls {BASE}").stdout.split() == ["l1"]
    assert w.alive()
    first = w.region_hash()
    time.sleep(0.3)
    assert w.region_hash() != first  # still churning: thawed, not frozen

# The VmFlags of the mappings that cover the region: [[first page, end page, flags], ...],
# without the tracker's userfaultfd registration (um, uw), which is not the workload's.
REGION_FLAGS = """
import json, sys
from memsnap import procfs
info = json.load(open(sys.argv[2]))
base, end, ps = info["base"], info["base"] + info["size"], info["page_size"]
print(json.dumps([[(max(m.start, base) - base) // ps, (min(m.end, end) - base) // ps, sorted(f - {"um", "uw"})]
                  for m, f in procfs.read_vmflags(int(sys.argv[1])) if m.start < end and m.end > base]))
"""


def region_flags(w, pid: int | None = None) -> list:
    return json.loads(sh(f"python3 -c '{REGION_FLAGS}' {pid or w.pid} {w.info_path}").stdout)


def test_vma_flags_read_before_the_freeze_come_back_after_restore(wl):
    """CRIU (patch 0009) takes VMA flags from the file memsnap wrote before the freeze, not
    from smaps while frozen: the restored workload has them all the same."""
    w = wl(mib=16, churn=500)
    checkpoint(w.pid, "l1")
    sh(f"python3 -c '{ADVISE}' {w.pid} {w.info_path} 64 128 {MADV_DONTFORK}")
    w.stop_churn()
    flags = region_flags(w)
    assert [[first, end] for first, end, f in flags if "dc" in f] == [[64, 192]]
    before = w.region_hash()
    checkpoint(w.pid, "final", "l1", final=True)
    manifest = json.loads(sh(f"cat {BASE}/final/memsnap-layer.json").stdout)
    assert manifest["vma_flags"] == "read before the freeze"
    restored = json.loads(memsnap("restore", "--dir", f"{BASE}/final").stdout)
    assert region_flags(w, restored["pid"]) == flags
    assert w.region_hash(restored["pid"]) == before
