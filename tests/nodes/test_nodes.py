"""`memsnap nodes`: up/list/exec/cp/down, isolation, and the veth between nodes."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from memsnap import nodes
from memsnap.nodes import cgroups, image, net, runtime

pytestmark = [pytest.mark.nodes, pytest.mark.slow, pytest.mark.timeout(1500)]


def test_up_is_idempotent_and_list_shows_the_nodes(cli, local_nodes):
    pids = {n.name: n.pid for n in local_nodes}
    again = cli("up")
    assert again.returncode == 0, again.stderr
    assert {n.name: n.pid for n in nodes.list_nodes() if n.name in pids} == pids
    listing = cli("list")
    assert listing.returncode == 0
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert rows["node-1"][1:4] == ["running", "198.18.0.11", str(pids["node-1"])]
    assert rows["node-2"][1:4] == ["running", "198.18.0.12", str(pids["node-2"])]
    assert image.cached() is not None and rows["node-1"][4] == image.cached().digest


def test_exec_passes_stdio_and_exit_code(cli, local_nodes):
    proc = cli("exec", "node-1", "--", "sh", "-c", 'read x; echo "out:$x"; echo err >&2; exit 3', input="hi\n")
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out:hi\n", "err\n")
    assert cli("exec", "node-1", "--", "true").returncode == 0
    assert cli("exec", "node-1", "--", "sh", "-c", "kill -TERM $$").returncode == 128 + 15


def test_exec_inherits_no_fd_above_2(cli, local_nodes):
    r, w = os.pipe()
    os.set_inheritable(r, True)
    try:
        proc = cli("exec", "node-1", "--", "sh", "-c", "ls /proc/$$/fd", close_fds=False)
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == ["0", "1", "2"]


def test_nodes_are_isolated(cli, local_nodes):
    for n in local_nodes:
        script = "hostname; tr '\\0' ' ' </proc/1/cmdline; echo; ip -o -4 addr show eth0; ip route"
        out = nodes.run(n.name, ["sh", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
        assert out[0] == n.name
        assert "memsnap-node-init" in out[1]  # PID 1 of the node is its init
        assert f"inet {n.address}/15" in out[2]
        assert not any(line.startswith("default") for line in out[3:])  # no route off the machine
    # The node sees its own cgroup as the root, and the host has its init in memsnap/NAME.
    own = nodes.run("node-1", ["cat", "/proc/self/cgroup"], capture_output=True, text=True, check=True).stdout
    assert all(line.endswith(":/") for line in own.splitlines())
    assert local_nodes[0].pid in cgroups.pids("node-1")


COUNTER = """
import time
n = 0
while True:
    n += 1
    open("/tmp/count.tmp", "w").write(str(n))
    __import__("os").rename("/tmp/count.tmp", "/tmp/count")
    time.sleep(0.01)
"""


def _count(node: str) -> int:
    return int(nodes.run(node, ["cat", "/tmp/count"], capture_output=True, text=True, check=True).stdout)


def test_node_cgroup_freezes_and_thaws(cli, local_nodes):
    worker = nodes.popen("node-2", ["python3", "-c", COUNTER])
    try:
        deadline = time.monotonic() + 10
        while nodes.run("node-2", ["test", "-e", "/tmp/count"]).returncode != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cgroups.freeze("node-2")
        try:
            # While frozen, exec into the node would freeze too: read the file from the host side.
            counter = Path(f"/proc/{nodes.get('node-2').pid}/root/tmp/count")
            frozen = int(counter.read_text())
            time.sleep(0.3)
            assert int(counter.read_text()) == frozen
        finally:
            cgroups.thaw("node-2")
        time.sleep(0.3)
        assert _count("node-2") > frozen
    finally:
        worker.kill()
        worker.wait()


def test_node_has_its_own_cgroups_and_down_removes_theirs(cli, local_nodes):
    """Tools in the node can make (and freeze) sub-cgroups at /sys/fs/cgroup; `down` removes them."""
    kinds = cgroups.hierarchies()
    if "cgroup2" not in kinds:
        pytest.skip("no cgroup2 hierarchy on this host")
    work = "/sys/fs/cgroup/unified/work" if len(kinds) > 1 else "/sys/fs/cgroup/work"
    # The inner shell freezes itself: it must not hold our pipe, or run() would wait forever.
    script = f"mkdir {work} && echo $$ > {work}/cgroup.procs && echo 1 > {work}/cgroup.freeze"
    check = f"sleep 0.5; grep '^0::' /proc/$(cat {work}/cgroup.procs)/cgroup; grep frozen {work}/cgroup.events"
    out = nodes.run("node-1", ["sh", "-c", f"sh -c '{script}' </dev/null >/dev/null 2>&1 & {check}"],
                    capture_output=True, text=True, timeout=30)
    assert out.stdout.splitlines() == ["0::/work", "frozen 1"], out.stdout + out.stderr
    host_side = cgroups.paths("node-1")["cgroup2"] / "work"
    assert host_side.is_dir()
    assert cli("down", "node-1").returncode == 0  # must thaw, kill and remove the frozen sub-cgroup
    assert not host_side.exists() and not host_side.parent.exists()
    assert cli("up", "--count", "2").returncode == 0


def test_checkout_is_importable_read_only(cli, local_nodes):
    script = """
        python3 -c 'import memsnap; print(memsnap.__file__)'
        touch /opt/memsnap/node-agent/x 2>/dev/null || echo read-only
        command -v memsnap
        python3 -c 'import pycriu.images, aiohttp, prometheus_client; print("libraries")'
    """
    proc = nodes.run("node-1", ["sh", "-c", script], capture_output=True, text=True)
    assert proc.stdout.split() == [f"{image.CHECKOUT_MOUNT}/memsnap/__init__.py", "read-only",
                                   "/usr/local/bin/memsnap", "libraries"], proc.stderr


def test_cp_file_and_directory(cli, local_nodes, tmp_path: Path):
    f = tmp_path / "tool.sh"
    f.write_text("#!/bin/sh\necho tool ran\n")
    f.chmod(0o755)
    assert cli("cp", str(f), "node-2:/root/").returncode == 0
    assert nodes.run("node-2", ["/root/tool.sh"], capture_output=True, text=True).stdout == "tool ran\n"
    assert cli("cp", str(f), "node-2:/root/renamed.sh").returncode == 0
    d = tmp_path / "tree"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "data").write_text("payload")
    assert cli("cp", str(d), "node-2:/srv/copied").returncode == 0
    out = nodes.run("node-2", ["cat", "/srv/copied/sub/data", "/root/renamed.sh"], capture_output=True, text=True)
    assert out.stdout == "payload#!/bin/sh\necho tool ran\n"
    # Only node-2 got them.
    assert nodes.run("node-1", ["test", "-e", "/root/tool.sh"]).returncode == 1


@pytest.mark.parametrize("args, needle", [
    (["exec", "node-9", "--", "true"], "node-9"),
    (["exec", "node-1"], "no command"),
    (["cp", "/etc/hostname", "node-1"], "NODE:/path"),
    (["cp", "/etc/hostname", "node-1:relative"], "absolute"),
    (["cp", "/no/such/file", "node-1:/root/"], "/no/such/file"),
    (["cp", "/etc/hostname", "node-9:/root/"], "node-9"),
    (["up", "--count", "0"], "--count"),
    (["down", "node-9"], "node-9"),
])
def test_bad_input_is_one_clear_line(cli, local_nodes, args, needle):
    proc = cli(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr


ECHO_SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000))
s.listen()
print("listening", flush=True)
c, _ = s.accept()
c.sendall(c.recv(100) + b" from " + socket.gethostname().encode())
"""

ECHO_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], 7000), timeout=5)
s.sendall(b"ping")
print(s.recv(100).decode())
"""


@pytest.mark.parametrize("target", ["198.18.0.12", "node-2"])
def test_node_1_reaches_node_2_over_the_veth(cli, local_nodes, target):
    server = nodes.popen("node-2", ["python3", "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "listening\n"
        client = nodes.run("node-1", ["python3", "-c", ECHO_CLIENT, target], capture_output=True, text=True, timeout=30)
        assert client.stdout == "ping from node-2\n", client.stderr
        assert server.wait(timeout=10) == 0
    finally:
        server.kill()


def test_host_reaches_a_node_on_the_bridge(cli, local_nodes):
    import socket
    server = nodes.popen("node-1", ["python3", "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "listening\n"
        with socket.create_connection(("198.18.0.11", 7000), timeout=5) as s:
            s.sendall(b"hello")
            assert s.recv(100) == b"hello from node-1"
    finally:
        server.kill()


def test_down_removes_everything_and_up_restores(cli, local_nodes):
    names = [n.name for n in local_nodes]
    pids = [n.pid for n in local_nodes]
    proc = cli("down")
    assert proc.returncode == 0, proc.stderr
    assert cli("down").returncode == 0  # idempotent
    assert not any(Path(f"/proc/{pid}").exists() and runtime._starttime(pid) for pid in pids)
    assert not net.link_exists(net.BRIDGE)
    assert not any(net.link_exists(net.host_veth(n)) for n in names)
    assert not any(p.exists() for n in names for p in cgroups.paths(n).values())
    assert not (runtime.STATE_DIR / "node-1").exists() and not (runtime.DATA_DIR / "node-1").exists()
    assert cli("list").stdout.splitlines()[1:] == []
    assert cli("exec", "node-1", "--", "true").returncode == 2
    started = time.monotonic()
    assert cli("up", "--count", "2").returncode == 0  # cached image: quick
    assert time.monotonic() - started < 30
    assert nodes.run("node-1", ["true"]).returncode == 0
