"""`memsnap agent` with two more routes of kind MEMORY, added the way the migration routes are:
POST /api/v1/test/echo answers which node called (auth.require_node); POST /api/v1/test/peer
answers any caller the route kind lets through. Run as a script, on the host or copied into a
node: python3 memory_agent.py AGENT-FLAGS..."""
import sys

from aiohttp import web

from memsnap import cli
from memsnap.agent import auth
from memsnap.commands import agent


async def echo(request: web.Request) -> web.Response:
    return web.json_response({"node": auth.require_node(request), "body": await request.text()})


async def peer(request: web.Request) -> web.Response:
    caller = auth.peer(request)
    return web.json_response({"name": caller.name, "role": caller.role})


def extend(app: web.Application) -> None:
    auth.add_routes(app, [web.post("/api/v1/test/echo", echo), web.post("/api/v1/test/peer", peer)],
                    kind=auth.MEMORY)


if __name__ == "__main__":
    sys.exit(agent.run(cli.build_parser().parse_args(["agent", *sys.argv[1:]]), extend=extend))
