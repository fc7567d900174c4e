"""Who may call what on the agent: every route has a kind, checked before its handler runs.

- OPEN (/metrics, /healthz, /readyz): anyone.
- READ (the /api/v1 reads): a client certificate signed by the memsnap CA, or the bearer token.
  An agent with neither TLS nor a token answers them only to loopback peers.
- MEMORY (calls that move, restore or delete memory): mutual TLS, always; a request that says
  which node it comes from (X-Memsnap-Node) must come with that node's certificate. Handlers
  that must know the calling node call require_node().

A refused request gets 401 or 403 with a one-line reason and nothing else. A path that matches
no route is checked as READ (no probing without credentials); a route registered without a
kind is checked as MEMORY. Register routes with add_routes(app, [web.post(...)], kind=MEMORY).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass
from typing import Iterable

from aiohttp import web

from .. import pki

OPEN, READ, MEMORY = "open", "read", "memory"
NODE_HEADER = "X-Memsnap-Node"

KINDS = web.AppKey("route_kinds", dict)  # {(resource, method): kind}
PEER = "memsnap_peer"  # request key: the verified pki.Peer, or None


@dataclass(frozen=True)
class Policy:
    token: str  # "" : none
    tls: bool  # whether the agent serves mutual TLS


def setup(app: web.Application, policy: Policy) -> None:
    """Install the check on app (before any add_routes)."""
    app[KINDS] = {}
    app.middlewares.append(_middleware(policy))


def add_routes(app: web.Application, routes: Iterable[web.RouteDef], kind: str) -> None:
    """Register aiohttp route definitions with their kind (OPEN, READ or MEMORY)."""
    if kind not in (OPEN, READ, MEMORY):
        raise ValueError(f"unknown route kind {kind!r}")
    for route in app.router.add_routes(list(routes)):
        app[KINDS][(route.resource, route.method)] = kind


def peer(request: web.Request) -> pki.Peer | None:
    """The caller's verified identity (None: no client certificate)."""
    return request.get(PEER)


def require_node(request: web.Request, claimed: str | None = None) -> str:
    """The name of the calling node, for MEMORY handlers; 403 unless the caller's certificate is
    the certificate of node `claimed` (default: the X-Memsnap-Node header)."""
    caller = peer(request)
    claimed = request.headers.get(NODE_HEADER, "") if claimed is None else claimed
    if caller is None or not caller.is_node:
        raise _http(web.HTTPForbidden, "this call is for nodes: a node certificate is required")
    if caller.name != claimed:
        raise _http(web.HTTPForbidden, f"the certificate names {caller.name}, not {claimed or 'the node claimed'}")
    return caller.name


def route_kind(request: web.Request) -> str:
    route = request.match_info.route
    if route.resource is None:  # nothing matched: a 404 or 405 to come
        return READ
    kinds = request.app[KINDS]
    kind = kinds.get((route.resource, route.method))
    if kind is None and route.method == "HEAD":
        kind = kinds.get((route.resource, "GET"))
    return kind or MEMORY


def _middleware(policy: Policy):
    @web.middleware
    async def authorize(request: web.Request, handler):
        kind = route_kind(request)
        request[PEER] = pki.request_peer(request) if policy.tls else None
        if kind == READ:
            _check_read(request, policy)
        elif kind == MEMORY:
            _check_memory(request)
        return await handler(request)
    return authorize


def _check_read(request: web.Request, policy: Policy) -> None:
    if peer(request) is not None:
        return
    if policy.token:
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {policy.token}".encode()):
            return
        raise _http(web.HTTPUnauthorized, "unauthorized: a client certificate or the bearer token is required",
                    headers={"WWW-Authenticate": 'Bearer realm="memsnap"'})
    if policy.tls:
        raise _http(web.HTTPUnauthorized, "unauthorized: a client certificate is required")
    if not _from_loopback(request):
        raise _http(web.HTTPForbidden, "this agent has neither TLS nor a token: its API answers on loopback only")


def _check_memory(request: web.Request) -> None:
    caller = peer(request)
    if caller is None:
        raise _http(web.HTTPUnauthorized, "unauthorized: this call needs mutual TLS with a memsnap certificate")
    claimed = request.headers.get(NODE_HEADER)
    if claimed is not None and not (caller.is_node and caller.name == claimed):
        raise _http(web.HTTPForbidden, f"the certificate names {caller.name}, not {claimed}")


def _from_loopback(request: web.Request) -> bool:
    peername = request.transport.get_extra_info("peername") if request.transport else None
    if not peername:
        return False
    try:
        address = ipaddress.ip_address(peername[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _http(cls, reason: str, headers: dict | None = None) -> web.HTTPException:
    return cls(text=json.dumps({"error": reason}), content_type="application/json", headers=headers)
