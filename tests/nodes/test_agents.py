"""The agent in every local node: real agents, real nodes, real mutual TLS against the host's CA."""
from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from memsnap import nodes, pki
from memsnap.agent.auth import NODE_HEADER
from memsnap.agent.client import AgentClient, AgentError
from memsnap.nodes import agents

pytestmark = [pytest.mark.nodes, pytest.mark.slow, pytest.mark.timeout(1500)]

MEMORY_AGENT = Path(__file__).resolve().parents[1] / "agent" / "memory_agent.py"


# Runs in a node: one call with the node's own identity, as memsnap's tools there make it.
NODE_CALL = """
import asyncio, json, sys
from memsnap.agent.client import AgentClient
node, port, method, path, data = sys.argv[1:]
async def main():
    async with AgentClient.in_node(node, int(port)) as agent:
        print(json.dumps(await agent.call_json(method, path, data=data or None)))
asyncio.run(main())
"""


def in_node(node: str, code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return nodes.run(node, ["python3", "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def node_call(source: str, target: str, method: str, path: str, port: int = agents.PORT, data: str = ""):
    """Call target's agent from inside source, as source (its /etc/memsnap/tls identity)."""
    proc = in_node(source, NODE_CALL, target, str(port), method, path, data)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def host_call(node: str, method: str, path: str, files: pki.TlsFiles | None = None, port: int = agents.PORT,
              **kwargs):
    """Call node's agent from the host as admin (or as the identity in files)."""
    async def go():
        client = agents.client(node, port=port) if files is None else \
            AgentClient(node, port, files=files, address=nodes.get(node).address)
        async with client:
            return await client.call_json(method, path, **kwargs)
    return asyncio.run(go())


def plain(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def start_in_node(node: str, argv: list[str], log: str) -> str:
    """Start argv detached in node; returns its pid (as the node sees it) for stop_in_node."""
    proc = nodes.run(node, ["sh", "-c", f'setsid "$@" </dev/null >{log} 2>&1 & echo $!', "sh", *argv],
                     capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def stop_in_node(node: str, pid: str) -> None:
    nodes.run(node, ["sh", "-c", f"kill {pid}; while kill -0 {pid} 2>/dev/null; do sleep 0.1; done"], timeout=30)


def wait_answering(check, what: str, timeout: float = 60):
    """check() once the server answers (connection refused and TLS errors until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AgentError, OSError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not answer in {timeout}s: {exc}")
            time.sleep(0.3)


@pytest.fixture(autouse=True)
def agents_answer(local_nodes):
    """Nodes left running by an older checkout have no agent: say so instead of failing oddly."""
    for n in local_nodes:
        try:
            host_call(n.name, "GET", "/healthz")
        except AgentError as exc:
            pytest.fail(f"{n.name} (started from {n.checkout or 'an unknown checkout'}) has no answering agent: "
                        f"{exc}; renew it with `memsnap nodes down` then `up`")


@pytest.fixture
def stranger(tmp_path) -> pki.TlsFiles:
    """A certificate for node-1 signed by another CA (trusting ours, so it can try)."""
    files = pki.TlsFiles(tmp_path / "s.crt", tmp_path / "s.key", tmp_path / "ca.crt")
    pki.write_credentials(pki.CA.new("another CA").issue_node("node-1", "198.18.0.11"), files,
                          pki.CA.load().cert_pem)
    return files


@pytest.fixture
def node1_cert(tmp_path) -> pki.TlsFiles:
    """node-1's identity from the real CA, held on the host (to claim to be someone else)."""
    ca = pki.CA.load()
    files = pki.TlsFiles(tmp_path / "n1.crt", tmp_path / "n1.key", tmp_path / "ca.crt")
    pki.write_credentials(ca.issue_node("node-1", "198.18.0.11"), files, ca.cert_pem)
    return files


def test_every_node_runs_an_agent_with_a_certificate_naming_it(local_nodes):
    for n in local_nodes:
        status = host_call(n.name, "GET", "/api/v1/status")
        assert status["node"] == n.name
        listing = nodes.run(n.name, ["stat", "-c", "%a %U %n", "/etc/memsnap/tls", "/etc/memsnap/tls/node.key",
                                     "/etc/memsnap/tls/node.crt"], capture_output=True, text=True, check=True)
        assert listing.stdout.split("\n")[:3] == ["700 root /etc/memsnap/tls", "600 root /etc/memsnap/tls/node.key",
                                                  "600 root /etc/memsnap/tls/node.crt"]
        pem = nodes.run(n.name, ["cat", "/etc/memsnap/tls/node.crt"], capture_output=True, check=True).stdout
        san = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert san.value.get_values_for_type(x509.DNSName) == [n.name]
        assert [str(a) for a in san.value.get_values_for_type(x509.IPAddress)] == [n.address]
        log = nodes.run(n.name, ["cat", agents.LOG], capture_output=True, text=True, check=True).stdout
        assert '"tls": true' in log, log
    assert stat.S_IMODE(pki.PKI_DIR.stat().st_mode) == 0o700
    assert stat.S_IMODE((pki.PKI_DIR / "ca.key").stat().st_mode) == 0o600


def test_node_1_reaches_node_2s_agent_over_mutual_tls(local_nodes):
    assert node_call("node-1", "node-2", "GET", "/api/v1/status")["node"] == "node-2"


def test_agents_refuse_clients_without_a_memsnap_certificate(local_nodes, stranger):
    node2 = nodes.get("node-2")
    # No client certificate: the TLS handshake succeeds (open routes), the API says 401 and no more.
    code = ("import ssl, urllib.request, urllib.error\n"
            "ctx = ssl.create_default_context(cafile='/etc/memsnap/tls/ca.crt')\n"
            "try:\n"
            "    urllib.request.urlopen('https://node-2:9650/api/v1/pods', context=ctx)\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code, e.read().decode())\n")
    proc = in_node("node-1", code)
    assert proc.returncode == 0, proc.stderr
    code_, body = proc.stdout.split(" ", 1)
    assert code_ == "401" and list(json.loads(body)) == ["error"]
    # A certificate from another CA: refused in the handshake, no answer at all.
    with pytest.raises(AgentError) as refused:
        host_call("node-2", "GET", "/api/v1/pods", files=stranger)
    assert refused.value.status is None
    # A client asking for node-1 but led to node-2's address refuses node-2's certificate.
    async def misled():
        async with AgentClient("node-1", files=pki.client_files("admin"), address=node2.address) as c:
            return await c.get_json("/api/v1/status")
    with pytest.raises(AgentError, match="TLS refused.*node-1"):
        asyncio.run(misled())


def test_metrics_answer_plain_and_nothing_else_does(local_nodes):
    address = nodes.get("node-2").address
    status, body = plain(f"http://{address}:9651/metrics")
    assert status == 200 and "memsnap_agent_cycles_total" in body
    assert plain(f"http://{address}:9651/healthz")[0] == 200
    assert plain(f"http://{address}:9651/api/v1/pods")[0] == 404


def test_memory_calls_need_the_certificate_of_the_node_they_claim(local_nodes, node1_cert, stranger):
    node2 = nodes.get("node-2")
    script = nodes.copy_in(MEMORY_AGENT, "node-2", "/tmp/")
    pid = start_in_node("node-2", ["python3", script, "--listen", f"{node2.address}:9660", "--node-name", "node-2",
                                   "--metrics-listen", "none", "--tls-cert", "/etc/memsnap/tls/node.crt",
                                   "--tls-key", "/etc/memsnap/tls/node.key", "--tls-ca", "/etc/memsnap/tls/ca.crt"],
                        "/tmp/memory-agent.log")
    try:
        wait_answering(lambda: host_call("node-2", "GET", "/healthz", port=9660), "the memory agent")
        echo = node_call("node-1", "node-2", "POST", "/api/v1/test/echo", port=9660, data="layer")
        assert echo == {"node": "node-1", "body": "layer"}
        # node-1's certificate, claiming to be node-2
        with pytest.raises(AgentError, match="403 the certificate names node-1, not node-2"):
            host_call("node-2", "POST", "/api/v1/test/echo", files=node1_cert, port=9660,
                      headers={NODE_HEADER: "node-2"})
        with pytest.raises(AgentError, match="403 this call is for nodes"):  # admin is not a node
            host_call("node-2", "POST", "/api/v1/test/echo", port=9660)
        with pytest.raises(AgentError) as refused:
            host_call("node-2", "POST", "/api/v1/test/echo", files=stranger, port=9660)
        assert refused.value.status is None
    finally:
        stop_in_node("node-2", pid)


def test_an_agent_without_tls_or_token_answers_its_api_on_loopback_only(local_nodes):
    node1 = nodes.get("node-1")
    pid = start_in_node("node-1", ["memsnap", "agent", "--listen", "0.0.0.0:9670", "--interval", "1"],
                        "/tmp/plain-agent.log")
    try:
        wait_answering(lambda: plain(f"http://{node1.address}:9670/healthz"), "the plain agent")
        fetch = ("import sys, urllib.request, urllib.error\n"
                 "try:\n"
                 "    print(urllib.request.urlopen(sys.argv[1]).status)\n"
                 "except urllib.error.HTTPError as e:\n"
                 "    print(e.code)\n")
        codes = {url: nodes.run(node, ["python3", "-c", fetch, url], capture_output=True, text=True).stdout.strip()
                 for node, url in [("node-1", "http://127.0.0.1:9670/api/v1/status"),
                                   ("node-1", f"http://{node1.address}:9670/api/v1/status"),
                                   ("node-2", "http://node-1:9670/api/v1/status")]}
        assert list(codes.values()) == ["200", "403", "403"], codes
        status, body = plain(f"http://{node1.address}:9670/api/v1/pods")  # from the host
        assert status == 403 and "loopback only" in body
        assert plain(f"http://{node1.address}:9670/metrics")[0] == 200
        log = nodes.run("node-1", ["cat", "/tmp/plain-agent.log"], capture_output=True, text=True).stdout
        assert "answers on loopback only" in log
    finally:
        stop_in_node("node-1", pid)
