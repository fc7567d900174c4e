"""A server checkpointed and restored: CRIU in the node image carries the socket-options fix.

Stock CRIU 4.1.1 cannot dump any inet socket on Linux 6.16+ ("Can't get 1:34 opt"): it asks
every socket for SO_PASSCRED/SO_PASSSEC, which those kernels refuse outside unix and netlink
sockets. node-agent/criu/patches/0001 restricts them, as upstream did.
"""
from __future__ import annotations

import json

import pytest

from test_checkpoint import memsnap, sh  # same directory (pytest puts it on sys.path)

pytestmark = [pytest.mark.nodes, pytest.mark.slow]

PORT = 7311
BASE = "/var/lib/memsnap-test-listener"
# 8 MiB of random bytes; every connection gets their hash.
SERVER = f"""
import hashlib, os, socket
buf = bytearray(os.urandom(8 << 20))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {PORT}))
s.listen()
open("/tmp/listener.ready", "w").close()
while True:
    c, _ = s.accept()
    c.sendall(hashlib.sha256(buf).hexdigest().encode())
    c.close()
"""
CLIENT = f"""
import socket
c = socket.create_connection(("127.0.0.1", {PORT}), timeout=10)
print(c.recv(100).decode())
"""


def ask() -> str:
    result = sh(f"python3 -c '{CLIENT}'", check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


@pytest.fixture
def server(local_nodes):
    sh("rm -f /tmp/listener.ready")
    pid = int(sh(f"setsid python3 -c '{SERVER}' </dev/null >/tmp/listener.log 2>&1 & echo $!").stdout)
    sh("for i in $(seq 200); do [ -e /tmp/listener.ready ] && exit 0; sleep 0.05; done; exit 1")
    pids = [pid]
    yield pids
    for p in pids:
        sh(f"kill -9 {p} 2>/dev/null || true")
    sh(f"rm -rf {BASE}; memsnap untrack")


def test_a_tcp_listener_survives_a_final_checkpoint_and_restore(server):
    before = ask()
    assert len(before) == 64
    memsnap("checkpoint", "--pid", str(server[0]), "--dir", f"{BASE}/l1")
    final = json.loads(memsnap("checkpoint", "--pid", str(server[0]), "--dir", f"{BASE}/final",
                               "--parent", f"{BASE}/l1", "--final").stdout)
    assert final["kind"] == "final"
    assert ask() == ""  # the server is gone: nothing listens
    restored = json.loads(memsnap("restore", "--dir", f"{BASE}/final").stdout)
    server.append(restored["pid"])
    assert ask() == before  # the restored listener accepts, with its memory intact
    assert ask() == before
