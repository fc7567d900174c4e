"""CRIU works inside a node: `criu check`, and a dump + restore keeps a process's memory."""
from __future__ import annotations

import pytest

from memsnap import nodes

pytestmark = [pytest.mark.nodes, pytest.mark.slow, pytest.mark.timeout(1500)]

# 64 MiB of random bytes; reports their hash before the dump and again on request after restore.
WORKLOAD = """
import hashlib, os, time
buf = bytearray(os.urandom(64 << 20))
open("/tmp/before.tmp", "w").write(hashlib.sha256(buf).hexdigest())
os.rename("/tmp/before.tmp", "/tmp/before")
while not os.path.exists("/tmp/go"):
    time.sleep(0.05)
open("/tmp/after.tmp", "w").write(hashlib.sha256(buf).hexdigest())
os.rename("/tmp/after.tmp", "/tmp/after")
while True:
    time.sleep(1)
"""

# Started detached (setsid, stdio from the node): a dumpable task holds nothing from outside.
START = """
rm -f /tmp/before /tmp/after /tmp/go
setsid python3 -c "$1" </dev/null >/tmp/workload.log 2>&1 &
echo $!
while [ ! -e /tmp/before ]; do sleep 0.05; done
"""

DUMP_RESTORE = """
set -e
pid=$1
rm -rf /var/tmp/ckpt && mkdir -p /var/tmp/ckpt
criu dump -t "$pid" -D /var/tmp/ckpt -o dump.log
! test -e /proc/$pid
criu restore -D /var/tmp/ckpt -d -o restore.log
test -e /proc/$pid
touch /tmp/go
while [ ! -e /tmp/after ]; do sleep 0.05; done
cat /tmp/before; echo; cat /tmp/after; echo
kill -9 "$pid"
"""


def test_criu_check_passes(cli, local_nodes):
    proc = cli("exec", "node-1", "--", "criu", "check")
    assert proc.returncode == 0 and "Looks good" in proc.stdout + proc.stderr, proc.stderr


def test_criu_dumps_and_restores_a_process_with_memory_intact(cli, local_nodes):
    start = nodes.run("node-2", ["sh", "-c", START, "sh", WORKLOAD], capture_output=True, text=True, timeout=60)
    assert start.returncode == 0, start.stderr
    pid = start.stdout.strip()
    proc = nodes.run("node-2", ["sh", "-c", DUMP_RESTORE, "sh", pid], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        logs = nodes.run("node-2", ["sh", "-c", "tail -20 /var/tmp/ckpt/*.log"], capture_output=True, text=True)
        pytest.fail(f"dump/restore failed: {proc.stderr}\n{logs.stdout}")
    before, after = proc.stdout.split()
    assert before == after and len(before) == 64


def test_the_node_runs_memsnaps_criu_build(cli, local_nodes):
    """node-agent/criu's build is installed over Debian's binary (kept aside, diverted)."""
    proc = cli("exec", "node-1", "--", "sh", "-c",
               "criu --help; dpkg-divert --list /usr/sbin/criu; test -x /usr/sbin/criu.debian")
    assert proc.returncode == 0, proc.stderr
    assert "--track-mem-uffd" in proc.stdout
    assert "diversion of /usr/sbin/criu to /usr/sbin/criu.debian" in proc.stdout
