"""What a killed agent leaves of a pod checkpoint, cleaned by the next one at start: a frozen
cgroup thawed, a parked tracker's fd taken out of the task, a half-written checkpoint removed;
the checkpoints themselves kept. A real process on this host, real uffd-wp tracking."""
from __future__ import annotations

import json

from memsnap import procfs
from memsnap.checkpoint import freezer
from memsnap.cgroupfs import leave
from memsnap.podcheckpoint import engine, store
from memsnap.tracking import VmaSelection, registry

from conftest import CLEAN, leftovers


def test_recover_thaws_untracks_and_drops_partials(workload, tmp_path, monkeypatch):
    monkeypatch.setattr(store, "ROOT", tmp_path / "checkpoints")
    w = workload(mib=8)
    w.send("write 0 64")
    tracker, _, _ = registry.arm(w.pid, "uffd-wp", VmaSelection())
    tracker.park()  # as a chain start (precopy.write) leaves it: fd injected, the agent gone
    assert leftovers(w.pid)["uffd_fds"] and registry.parked_backend(w.pid)
    cgroup = freezer.own_cgroup(w.pid)
    try:
        cgroup.freeze()
        cid = store.root("a1b2")
        (cid / ".partial-20261201t000000-000z" / "counter").mkdir(parents=True)
        (cid / "20261130t000000-000z").mkdir()
        (cid / store.RECORD).write_text(json.dumps({
            "pod": {"namespace": "default", "name": "p", "uid": "u"},
            "pids": [[w.pid, procfs.read_stat(w.pid).starttime]], "freezers": [[str(cgroup.path), cgroup.v2]]}))

        said = engine.recover()  # what the next agent runs at start

        assert not cgroup.frozen(), said
        assert leftovers(w.pid) == CLEAN and registry.parked_backend(w.pid) is None, said
        assert not list(cid.glob(".partial-*")) and (cid / "20261130t000000-000z").is_dir()
        assert w.send("write 0 1") is not None  # it runs and answers
    finally:
        cgroup.thaw()
        leave(cgroup.path)
