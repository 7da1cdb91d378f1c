"""
The node's status page: what an operator watches while a backlog drains.

``GET /status`` answers JSON: the node, its engine's per-route pacing (state
and why, window, share of the hub's connections, attempts running and
waiting, deliveries in the last minute, back-pressure events, the backlog
and the time left at this pace, the drain under way or the last one), the
routes' hub-wide states, and the spool's counts.  ``GET /health`` answers ``200 ok`` when the
spool store answers, ``503`` otherwise, for load balancers and monitoring.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.iweb import IRequest

__all__ = ["StatusResource"]


class _Status(resource.Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, node: Any, store: Any, health: bool) -> None:
        super().__init__()
        self._node = node
        self._store = store
        self._health = health

    def render_GET(self, request: IRequest) -> Any:
        ensureDeferred(self._answer(request))
        return server.NOT_DONE_YET

    async def _answer(self, request: Any) -> None:
        try:
            counts = await self._store.counts()
        except Exception as e:
            self.log.failure("status: the spool store did not answer")
            request.setResponseCode(503)
            body: Any = {"node": self._node.name, "error": f"spool store unavailable: {e}"}
        else:
            engine = self._node.engine.status()
            backlog = counts.get("routes", {})
            for route, t in engine["routes"].items():
                # Progress: the route's backlog in the spool, and the time
                # left at this node's pace (RouteThrottle.pace_per_minute).
                t["backlog"] = backlog.get(route, 0)
                pace = t["pace_per_minute"]
                flowing = t.get("state") in ("up", "back-pressure")
                t["eta_seconds"] = round(60.0 * t["backlog"] / pace) if t["backlog"] and pace and flowing else None
            body = {"node": self._node.name, "spool": counts, "engine": engine}
            if self._health:
                body = {"node": self._node.name, "status": "ok"}
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        if not request.finished and not getattr(request, "_disconnected", False):
            request.write(json.dumps(body, indent=2).encode() + b"\n")
            request.finish()


class StatusResource(resource.Resource):
    """The root of a node's web listener."""

    def __init__(
        self, node: Any, store: Any, archive_api: resource.Resource | None = None,
        livearchive: resource.Resource | None = None,
    ) -> None:
        super().__init__()
        self._live = livearchive
        self.putChild(b"status", _Status(node, store, health=False))
        self.putChild(b"health", _Status(node, store, health=True))
        if archive_api is not None:
            api = resource.Resource()
            api.putChild(b"archive", archive_api)
            self.putChild(b"api", api)

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        """Every other path is the LiveArchive's (its pages), when it is served."""
        if self._live is not None:
            request.postpath.insert(0, path)
            request.prepath.pop()
            return self._live
        return resource.NoResource()
