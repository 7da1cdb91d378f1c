"""
The redis store's Lua scripts, each kept in a ``.lua`` file beside this
module (package data, so an installed copy has them too).

Every script is ``prelude.lua`` (the key helpers: ``ekey``, ``dkey``,
``schedule``, ``unschedule``, ``counter``, ``drop``) followed by its own
file; the comment at the top of each file says what its ``ARGV`` is and
what it returns.  ``ARGV[1]`` is always the key prefix.  ``RECORD_MANY``
runs ``record.lua`` once per record, as a Lua function.

The files are read once, when this module is imported (at plugin lookup,
before the reactor runs), never on the reactor thread while it serves.
"""

from __future__ import annotations

import functools
import hashlib
from importlib.resources import files

__all__ = [
    "BODIES", "CLAIM", "COUNTS", "DELETE", "ENQUEUE", "FLUSH", "HOLD", "LEASED", "NEXT_DUE",
    "NODES", "PAGE", "PRELUDE", "RECLAIM", "RECORD", "RECORD_MANY", "RELEASE", "RELEASE_HELD",
    "REQUEUE", "SET_ROUTE_STATE", "SHARE", "sha1",
]


def _read(name: str) -> str:
    return files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


PRELUDE = _read("prelude")


def _script(name: str) -> str:
    return PRELUDE + _read(name)


ENQUEUE = _script("enqueue")
CLAIM = _script("claim")
RECORD = _script("record")
RECORD_MANY = (
    PRELUDE
    + "local function record(ARGV)\n"
    + _read("record")
    + "end\n"
    + _read("record_many")
)
BODIES = _script("bodies")
RELEASE = _script("release")
RECLAIM = _script("reclaim")
NEXT_DUE = _script("next_due")
HOLD = _script("hold")
RELEASE_HELD = _script("release_held")
FLUSH = _script("flush")
DELETE = _script("delete")
REQUEUE = _script("requeue")
LEASED = _script("leased")
COUNTS = _script("counts")
NODES = _script("nodes")
PAGE = _script("page")
SHARE = _script("share")
SET_ROUTE_STATE = _script("set_route_state")


@functools.cache
def sha1(script: str) -> str:
    """The SHA1 Redis knows ``script`` by (``EVALSHA``)."""
    return hashlib.sha1(script.encode()).hexdigest()
