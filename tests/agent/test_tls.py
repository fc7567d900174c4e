"""The agent's mutual TLS on loopback: a real agent, a CA of the test's own, real clients.
(The same with real agents in local nodes: tests/nodes/test_agents.py.)"""
from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from memsnap import pki
from memsnap.agent.auth import NODE_HEADER
from memsnap.agent.client import AgentClient, AgentError

from conftest import MEMSNAP

from .conftest import AGENT

pytestmark = pytest.mark.slow

MEMORY_AGENT = [sys.executable, str(Path(__file__).with_name("memory_agent.py"))]


class Pki:
    """A CA in tmp_path, node-1's files (what the agent serves with) and clients' files."""

    def __init__(self, root: Path):
        self.root = root
        self.ca = pki.CA.ensure(root / "pki")
        self.node = self.identity("node-1", self.ca.issue_node("node-1", "198.18.0.11"))
        self.admin = pki.client_files("admin", root / "pki")
        other = pki.CA.new("another CA")
        self.stranger = self.identity("stranger", other.issue_node("node-1", "198.18.0.11"))

    def identity(self, label: str, creds: pki.Credentials) -> pki.TlsFiles:
        """Files that trust our CA (to reach the agent) and show creds, whoever signed them."""
        d = self.root / label
        files = pki.TlsFiles(d / "tls.crt", d / "tls.key", d / "ca.crt")
        pki.write_credentials(creds, files, self.ca.cert_pem)
        return files

    def agent_flags(self) -> list[str]:
        return ["--tls-cert", str(self.node.cert), "--tls-key", str(self.node.key), "--tls-ca", str(self.node.ca),
                "--node-name", "node-1"]


@pytest.fixture
def tls(tmp_path) -> Pki:
    return Pki(tmp_path)


def call(files: pki.TlsFiles, port: int, method: str, path: str, node: str = "node-1", **kwargs):
    async def go():
        async with AgentClient(node, port, files=files, address="127.0.0.1", timeout=10) as c:
            return await c.call_json(method, path, **kwargs)
    return asyncio.run(go())


def anonymous(port: int, path: str, method: str = "GET", **kwargs) -> tuple[int, dict]:
    """HTTPS without a client certificate (the server's certificate still checked)."""
    async def go():
        ctx = ssl.create_default_context(cafile=None)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        async with aiohttp.ClientSession() as s:
            async with s.request(method, f"https://127.0.0.1:{port}{path}", ssl=ctx, **kwargs) as r:
                return r.status, await r.json(content_type=None)
    return asyncio.run(go())


def test_files_are_root_only_and_certificates_name_their_holder(tls):
    assert stat.S_IMODE((tls.root / "pki").stat().st_mode) == 0o700
    for f in (tls.root / "pki" / "ca.key", tls.admin.key, tls.node.key):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    node = x509.load_pem_x509_certificate(tls.node.cert.read_bytes())
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-1"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["198.18.0.11"]
    admin = x509.load_pem_x509_certificate(tls.admin.cert.read_bytes())
    assert list(admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]  # a client certificate cannot serve as an agent
    assert pki.identity_of(tls.node.cert.read_bytes()) == pki.Peer("node-1", "node")
    assert pki.identity_of(tls.admin.cert.read_bytes()) == pki.Peer("admin", "client")
    with pytest.raises(ValueError, match="invalid identity name"):
        tls.ca.issue_client("Admin/../x")


def test_tls_agent_serves_certificates_and_the_token_and_refuses_the_rest(agent, tls, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    a = agent(*tls.agent_flags(), "--token-file", str(token), tls=True)
    assert call(tls.admin, a.port, "GET", "/api/v1/status")["node"] == "node-1"
    assert anonymous(a.port, "/api/v1/pods") == (401, {"error": "unauthorized: a client certificate or the bearer "
                                                                "token is required"})
    assert anonymous(a.port, "/api/v1/pods", headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert anonymous(a.port, "/healthz") == (200, {"ok": True})  # open, over TLS too
    with pytest.raises(AgentError) as refused:  # signed by another CA: no answer at all
        call(tls.stranger, a.port, "GET", "/api/v1/pods")
    assert refused.value.status is None
    with pytest.raises(AgentError, match="TLS refused.*node-2"):  # the agent is node-1, not node-2
        call(tls.admin, a.port, "GET", "/api/v1/status", node="node-2")
    # The plain port has the open routes and nothing else.
    assert a.get("/metrics")[0] == 200 and "memsnap_agent_cycles_total" in a.get("/metrics")[1]
    assert a.get("/api/v1/pods")[0] == 404


def test_memory_routes_need_the_certificate_of_the_node_they_claim(agent, tls, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    a = agent(*tls.agent_flags(), "--token-file", str(token), tls=True, command=MEMORY_AGENT)
    assert anonymous(a.port, "/api/v1/status", headers={"Authorization": "Bearer s3cret"})[0] == 200
    # node-1's own certificate, saying it is node-1 (AgentClient sets the header from it)
    assert call(tls.node, a.port, "POST", "/api/v1/test/echo", data="hi") == {"node": "node-1", "body": "hi"}
    with pytest.raises(AgentError, match="403 the certificate names node-1, not node-2"):
        call(tls.node, a.port, "POST", "/api/v1/test/echo", headers={NODE_HEADER: "node-2"})
    with pytest.raises(AgentError, match="403 this call is for nodes"):  # a client identity is no node
        call(tls.admin, a.port, "POST", "/api/v1/test/echo")
    status, body = anonymous(a.port, "/api/v1/test/echo", method="POST")
    assert status == 401 and list(body) == ["error"]
    # The route kind alone (a handler that does not ask which node): any memsnap certificate,
    # but one that claims a node must be that node's.
    assert call(tls.admin, a.port, "POST", "/api/v1/test/peer") == {"name": "admin", "role": "client"}
    assert call(tls.node, a.port, "POST", "/api/v1/test/peer") == {"name": "node-1", "role": "node"}
    with pytest.raises(AgentError, match="403 the certificate names admin, not node-1"):
        call(tls.admin, a.port, "POST", "/api/v1/test/peer", headers={NODE_HEADER: "node-1"})
    with pytest.raises(AgentError, match="403 the certificate names node-1, not node-2"):
        call(tls.node, a.port, "POST", "/api/v1/test/peer", headers={NODE_HEADER: "node-2"})
    token = anonymous(a.port, "/api/v1/test/peer", method="POST", headers={"Authorization": "Bearer s3cret"})
    assert token[0] == 401  # the token never moves memory
    with pytest.raises(AgentError) as refused:
        call(tls.stranger, a.port, "POST", "/api/v1/test/echo")
    assert refused.value.status is None


@pytest.mark.parametrize("flags, error", [
    (["--tls-cert", "CERT", "--tls-key", "KEY"], "TLS needs --tls-cert, --tls-key and --tls-ca; missing --tls-ca"),
    (["--tls-cert", "CERT", "--tls-key", "OTHERKEY", "--tls-ca", "CA"], "do not make a certificate and key"),
    (["--tls-cert", "CERT", "--tls-key", "KEY", "--tls-ca", "/nonexistent/ca.crt"], "cannot read /nonexistent/ca.crt"),
    (["--metrics-listen", "127.0.0.1:1"], "--metrics-listen is for TLS agents"),
])
def test_bad_tls_flags_get_a_one_line_error(tls, flags, error):
    names = {"CERT": tls.node.cert, "KEY": tls.node.key, "CA": tls.node.ca, "OTHERKEY": tls.admin.key}
    argv = [str(names.get(f, f)) for f in flags]
    proc = subprocess.run([*AGENT, "--listen", "127.0.0.1:0", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and error in proc.stderr, proc.stderr


def test_agent_without_tls_or_token_says_its_api_is_loopback_only(agent, tmp_path):
    a = agent()
    assert a.get("/api/v1/status")[0] == 200  # from loopback (other peers: tests/nodes/test_agents.py)
    lines = [json.loads(line) for line in a.log.read_text().splitlines() if line.startswith("{")]
    assert any("loopback only" in line.get("msg", line.get("message", "")) for line in lines), lines


def test_pki_command_issues_what_an_agent_serves_with(agent, tls):
    env = {**os.environ, "MEMSNAP_PKI_DIR": str(tls.root / "pki")}  # the CA the test's clients trust
    out = tls.root / "node-3"
    proc = subprocess.run([*MEMSNAP, "pki", "node", "node-3", "--address", "198.18.0.13", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == str(out), proc.stderr
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == \
        {"tls.crt": 0o600, "tls.key": 0o600, "ca.crt": 0o600}
    a = agent("--tls-cert", str(out / "tls.crt"), "--tls-key", str(out / "tls.key"), "--tls-ca", str(out / "ca.crt"),
              "--node-name", "node-3", tls=True)
    assert call(tls.admin, a.port, "GET", "/api/v1/status", node="node-3")["node"] == "node-3"
    for bad, error in ((["client", "Admin", "--out", str(out)], "invalid identity name 'Admin'"),
                       (["node", "node-4", "--address", "300.1.1.1", "--out", str(out)], "'300.1.1.1' does not")):
        proc = subprocess.run([*MEMSNAP, "pki", *bad], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and error in proc.stderr, proc.stderr
