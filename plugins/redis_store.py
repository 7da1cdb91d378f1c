"""
The ``redis`` spool store: one spool shared by nodes on several hosts.

Every change is one Lua script (``EVAL``), so it is atomic across every node
of every process sharing the Redis: an enqueue stores all of its entries or
none, and a claim leases each due entry to exactly one node.  Claiming sets
``next_attempt`` to the lease's expiry, so an abandoned lease needs no sweep:
its entry is simply due again.  ``record`` and ``release`` act only while the
entry still carries their lease's token.

The ``record`` and ``body`` calls made in one turn of the reactor go to Redis
together, as one script each (``_RECORD_MANY``, ``_BODIES``), each call still
getting its own result: in a drain, deliveries end and bodies are read ahead
many at a time, and every call to Redis costs the reactor thread a reply to
parse and a timeout to arm.  If the shared script fails, every call in it does.

Durability is Redis's: run it with ``appendonly yes`` and ``appendfsync
always`` so that a reply means the write is on disk, and/or set
``wait_replicas`` so that ``enqueue`` and ``record`` also wait for ``WAIT``
to confirm that many replicas have the write.

Every command has a timeout (``command_timeout``): a Redis that is down, or
up but not answering, makes a call fail with ``StoreUnavailable`` within that
time, never hang.  Calls in flight when the connection drops fail at once.
The connections are re-established by themselves, at most
``reconnect_max_delay`` after Redis is back, however long it was away; with
Sentinel, on the master Sentinel names.  When ``WAIT`` does not confirm an
enqueue, its entries are taken back (best effort) since the client is told to
try again later.

txredisapi installs the default reactor when imported, so this module imports
it only when a store is made, never at plugin discovery.

Configuration (the ``[store]`` table)::

    plugin = "redis"
    host = "127.0.0.1"          # or url = "redis://:password@host:6379/0"
    port = 6379
    db = 0
    password = "..."            # optional; username = "..." for an ACL user
    key_prefix = "mailhub:"     # several hubs can share one Redis
    command_timeout = 5.0       # seconds
    wait_replicas = 0           # > 0: a write waits for WAIT N to confirm it
                                # (for half of command_timeout at most)
    max_spool_bytes = 0         # > 0: enqueue fails with StoreFull when the spooled
                                # message bodies would exceed it (so does Redis OOM)
    sentinels = ["10.0.0.1:26379", "10.0.0.2:26379"]   # with master = "mymaster"
    master = "mymaster"
    pool_size = 2               # connections per node
    reconnect_max_delay = 2.0   # seconds between reconnection attempts, at most

Keys (all under ``key_prefix``; one spool per prefix)::

    e:<entry>   hash: data (JSON), next, node, held, token, lnode (the node
                      that took the last lease), linc (its incarnation,
                      ``ILeaseReclaim``), route, mid, pending
    a:<entry>   list: the attempts log, JSON, oldest first
    m:<msg>     hash: body, refs (entries using it), size
    due         zset: unreserved, unheld entries by next attempt (leased ones
                      by lease expiry)
    due:<node>  zset: the same for entries reserved for <node>
    nodes       set:  the nodes that have a due:<node>
    all         zset: every entry by next attempt, for listings
    held, leased  sets of entry ids
    routes      hash: route -> entries;  recipients, bytes: counters
    heartbeats  hash: node -> JSON {"last_seen", "info"} (``INodeRegistry``)
    shares:<route>  hash: node -> "given want expires", the nodes' shares of
                      the route's connections (``IRouteCoordination.share``)
    route_states    hash: route -> JSON, routes' hub-wide states

A key is removed as soon as it is empty, so an empty spool holds no key
(``heartbeats`` excepted: it lives as long as the hub's nodes do; so does a
``shares:<route>`` until every node has given its share back, or its share
expired and a later ``share`` of the route dropped it).  The scripts name
keys they compute from the prefix, so the store needs one Redis (or a
Sentinel-managed master), not a Redis Cluster.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.interfaces import (
    ILeaseReclaim,
    INodeRegistry,
    IRouteCoordination,
    ISpoolStore,
    IStorePlugin,
)
from mailhub.model import (
    Address,
    Attempt,
    Decision,
    Entry,
    EntryFilter,
    Envelope,
    Lease,
    LeaseLost,
    Recipient,
    RecipientState,
    Reply,
    StoreFull,
    StoreUnavailable,
    apply_decision,
    new_entries,
)

__all__ = ["RedisSpoolStore", "plugin"]

_T = TypeVar("_T")
_log = Logger()

DEFAULT_PREFIX = "mailhub:"
DEFAULT_COMMAND_TIMEOUT = 5.0
DEFAULT_POOL_SIZE = 2
DEFAULT_RECONNECT_MAX_DELAY = 2.0
_PAGE = 500

# -- the scripts ------------------------------------------------------------
#
# ARGV[1] is always the key prefix.  Times travel as the decimal strings
# Python's repr() makes, and are stored as given: Lua's tostring() would round
# them to 14 digits.

_PRELUDE = """
local P = ARGV[1]
local function ekey(id) return P .. 'e:' .. id end
local function dkey(node)
  if node == '' then return P .. 'due' end
  return P .. 'due:' .. node
end
local function unschedule(id, node)
  local k = dkey(node)
  if redis.call('ZREM', k, id) == 1 and node ~= '' and redis.call('EXISTS', k) == 0 then
    redis.call('SREM', P .. 'nodes', node)
  end
end
local function schedule(id, node, nxt, held)
  redis.call('ZADD', P .. 'all', nxt, id)
  if held == '1' then
    redis.call('SADD', P .. 'held', id)
  else
    redis.call('SREM', P .. 'held', id)
    if node ~= '' then redis.call('SADD', P .. 'nodes', node) end
    redis.call('ZADD', dkey(node), nxt, id)
  end
end
local function counter(name, by)
  -- INCRBY refuses the "-0" that Lua makes of -0 (an empty message's size).
  if by == 0 then return end
  if redis.call('INCRBY', P .. name, by) <= 0 then redis.call('DEL', P .. name) end
end
local function drop(id)
  local f = redis.call('HMGET', ekey(id), 'node', 'mid', 'route', 'pending')
  if not f[2] then return 0 end
  unschedule(id, f[1])
  redis.call('ZREM', P .. 'all', id)
  redis.call('SREM', P .. 'held', id)
  redis.call('SREM', P .. 'leased', id)
  redis.call('DEL', ekey(id), P .. 'a:' .. id)
  local mk = P .. 'm:' .. f[2]
  if redis.call('HINCRBY', mk, 'refs', -1) <= 0 then
    local size = tonumber(redis.call('HGET', mk, 'size') or '0')
    redis.call('DEL', mk)
    counter('bytes', -size)
  end
  if redis.call('HINCRBY', P .. 'routes', f[3], -1) <= 0 then
    redis.call('HDEL', P .. 'routes', f[3])
  end
  counter('recipients', -tonumber(f[4]))
  return 1
end
"""


def _script(body: str) -> str:
    return _PRELUDE + body


# ARGV: prefix, max_bytes, message_id, body, size, lease node, lease
#       incarnation, n, then per entry: id, route, data, pending, next, node,
#       lease token ('' for none), attempt ('' for none).
# A leased entry is stored as _CLAIM leaves one; one with an attempt as
# _RECORD leaves one after it.  Returns the number of entries, or -1 (and
# writes nothing) when full.
_ENQUEUE = _script("""
local max, mid, size = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[5])
local lnode, linc, n = ARGV[6], ARGV[7], tonumber(ARGV[8])
if max > 0 and tonumber(redis.call('GET', P .. 'bytes') or '0') + size > max then
  return -1
end
redis.call('HSET', P .. 'm:' .. mid, 'body', ARGV[4], 'refs', n, 'size', size)
counter('bytes', size)
for i = 0, n - 1 do
  local b = 9 + i * 8
  local id, route, data, pending = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
  local nxt, node, token, attempt = ARGV[b + 4], ARGV[b + 5], ARGV[b + 6], ARGV[b + 7]
  if token == '' then
    redis.call('HSET', ekey(id), 'data', data, 'next', nxt, 'node', node,
               'held', '0', 'token', '', 'route', route, 'mid', mid, 'pending', pending)
    schedule(id, node, nxt, '0')
    if attempt ~= '' then redis.call('RPUSH', P .. 'a:' .. id, attempt) end
  else
    redis.call('HSET', ekey(id), 'data', data, 'next', nxt, 'node', '',
               'held', '0', 'token', token, 'lnode', lnode, 'linc', linc, 'route', route,
               'mid', mid, 'pending', pending)
    redis.call('SADD', P .. 'leased', id)
    schedule(id, '', nxt, '0')
  end
  redis.call('HINCRBY', P .. 'routes', route, 1)
  counter('recipients', tonumber(pending))
end
return n
""")

# ARGV: prefix, node, now, limit, expires, takeover, token base, the node's
#       incarnation, 'ids' | 'due', then the ids.  Returns {id, token, data,
#       next, node, held} per lease.
_CLAIM = _script("""
local node, now, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local expires, takeover, base, linc = ARGV[5], tonumber(ARGV[6]), ARGV[7], ARGV[8]
local found = {}
local function consider(id, nxt, owner)
  local t = tonumber(nxt)
  if owner ~= '' and owner ~= node then
    if t + takeover > now then return end
  elseif t > now then return end
  table.insert(found, {id, t})
end
if ARGV[9] == 'ids' then
  for i = 10, #ARGV do
    local f = redis.call('HMGET', ekey(ARGV[i]), 'next', 'node', 'held')
    if f[1] and f[3] == '0' then consider(ARGV[i], f[1], f[2]) end
  end
else
  local function take(owner, upto)
    local r = redis.call('ZRANGEBYSCORE', dkey(owner), '-inf', upto,
                         'WITHSCORES', 'LIMIT', 0, limit)
    for i = 1, #r, 2 do consider(r[i], r[i + 1], owner) end
  end
  take('', now)
  for _, owner in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
    if owner == node then take(owner, now) else take(owner, now - takeover) end
  end
end
table.sort(found, function(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  return a[1] < b[1]
end)
local out = {}
for i = 1, math.min(limit, #found) do
  local id = found[i][1]
  local f = redis.call('HMGET', ekey(id), 'data', 'next', 'node', 'held')
  local token = base .. '.' .. i
  unschedule(id, f[3])
  redis.call('HSET', ekey(id), 'next', expires, 'node', '', 'token', token, 'lnode', node,
             'linc', linc)
  redis.call('SADD', P .. 'leased', id)
  schedule(id, '', expires, '0')
  table.insert(out, {id, token, f[1], f[2], f[3], f[4]})
end
return out
""")

# ARGV: prefix, id, token, data, next, node, pending, hold, attempt.
# Returns -1 lease lost, 0 entry gone, 1 kept, 2 kept and held.
_RECORD = _script("""
local id, k = ARGV[2], ekey(ARGV[2])
local f = redis.call('HMGET', k, 'token', 'node', 'held', 'pending')
if not f[1] or f[1] ~= ARGV[3] then return -1 end
local pending = tonumber(ARGV[7])
if pending == 0 then
  drop(id)
  return 0
end
local held = '0'
if f[3] == '1' or ARGV[8] == '1' then held = '1' end
unschedule(id, f[2])
redis.call('HSET', k, 'data', ARGV[4], 'next', ARGV[5], 'node', ARGV[6],
           'held', held, 'token', '', 'pending', pending)
redis.call('SREM', P .. 'leased', id)
counter('recipients', pending - tonumber(f[4]))
redis.call('RPUSH', P .. 'a:' .. id, ARGV[9])
schedule(id, ARGV[6], ARGV[5], held)
return tonumber(held) + 1
""")

# ARGV: prefix, n, then per record the 8 arguments of _RECORD after its
# prefix.  Returns the list of what _RECORD returns for each, in order.
_RECORD_MANY = _script(
    "local function record(ARGV)\n"
    + _RECORD[len(_PRELUDE):]
    + """end
local out, n = {}, tonumber(ARGV[2])
for i = 0, n - 1 do
  local args = {ARGV[1]}
  for j = 1, 8 do args[j + 1] = ARGV[2 + i * 8 + j] end
  out[i + 1] = record(args)
end
return out
""")

# ARGV: prefix, then message ids.  Returns their bodies (nil for one not there).
_BODIES = _script("""
local out = {}
for i = 2, #ARGV do
  out[i - 1] = redis.call('HGET', P .. 'm:' .. ARGV[i], 'body') or false
end
return out
""")

# ARGV: prefix, id, token, now.
_RELEASE = _script("""
local id, k = ARGV[2], ekey(ARGV[2])
local f = redis.call('HMGET', k, 'token', 'node', 'held')
if not f[1] or f[1] ~= ARGV[3] then return 0 end
unschedule(id, f[2])
redis.call('HSET', k, 'next', ARGV[4], 'node', '', 'token', '')
redis.call('SREM', P .. 'leased', id)
schedule(id, '', ARGV[4], f[3])
return 1
""")

# ARGV: prefix, node, incarnation, now.  Entries leased to the node under
# another incarnation (or none: '') are due now, reserved for it.  Returns
# how many.
_RECLAIM = _script("""
local node, linc, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', P .. 'leased')) do
  local k = ekey(id)
  local f = redis.call('HMGET', k, 'token', 'lnode', 'linc', 'next', 'held')
  if f[1] and f[1] ~= '' and f[2] == node and f[3] ~= linc and tonumber(f[4]) > now then
    unschedule(id, '')
    redis.call('HSET', k, 'next', ARGV[4], 'node', node, 'token', '', 'linc', '')
    redis.call('SREM', P .. 'leased', id)
    schedule(id, node, ARGV[4], f[5])
    n = n + 1
  end
end
return n
""")

# ARGV: prefix, node.  Returns {score, 1 if reserved for another node} or nil.
_NEXT_DUE = _script("""
local node, best, other = ARGV[2], nil, 0
local function first(owner, add, flag)
  local r = redis.call('ZRANGE', dkey(owner), 0, 0, 'WITHSCORES')
  if r[1] then
    local t = tonumber(r[2]) + add
    if best == nil or t < best[1] then best = {t, r[2], flag} end
  end
end
first('', 0, 0)
for _, owner in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
  if owner == node then first(owner, 0, 0) else first(owner, tonumber(ARGV[3]), 1) end
end
if best == nil then return false end
return {best[2], best[3]}
""")

# ARGV: prefix, id.
_HOLD = _script("""
local id, k = ARGV[2], ekey(ARGV[2])
local f = redis.call('HMGET', k, 'node', 'held', 'next')
if not f[1] then return 0 end
if f[2] ~= '1' then
  unschedule(id, f[1])
  redis.call('HSET', k, 'held', '1')
  schedule(id, f[1], f[3], '1')
end
return 1
""")

# ARGV: prefix, id, now.  A held entry still under lease stays due at its
# lease's expiry, so releasing it never hands it to a second node.
_RELEASE_HELD = _script("""
local id, k = ARGV[2], ekey(ARGV[2])
local f = redis.call('HMGET', k, 'node', 'held', 'next', 'token')
if not f[1] then return 0 end
if f[2] == '1' then
  local nxt = ARGV[3]
  if f[4] ~= '' and tonumber(f[3]) > tonumber(ARGV[3]) then nxt = f[3] end
  unschedule(id, f[1])
  redis.call('HSET', k, 'held', '0', 'next', nxt, 'node', '')
  schedule(id, '', nxt, '0')
end
return 1
""")

# ARGV: prefix, '1' to match the route | '0' for all, route, now.
_FLUSH = _script("""
local now, n = tonumber(ARGV[4]), 0
local owners = {''}
for _, owner in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do table.insert(owners, owner) end
for _, owner in ipairs(owners) do
  for _, id in ipairs(redis.call('ZRANGE', dkey(owner), 0, -1)) do
    local f = redis.call('HMGET', ekey(id), 'route', 'next', 'token')
    local t = tonumber(f[2])
    local leased = f[3] ~= '' and t > now
    if not leased and (ARGV[2] == '0' or f[1] == ARGV[3]) then
      local nxt = f[2]
      if t > now then nxt = ARGV[4] end
      unschedule(id, owner)
      redis.call('HSET', ekey(id), 'next', nxt, 'node', '')
      schedule(id, '', nxt, '0')
      n = n + 1
    end
  end
end
return n
""")

# ARGV: prefix, id.
_DELETE = _script("return drop(ARGV[2])\n")

# ARGV: prefix, now.
_COUNTS = _script("""
local now, leased = tonumber(ARGV[2]), 0
for _, id in ipairs(redis.call('SMEMBERS', P .. 'leased')) do
  local f = redis.call('HMGET', ekey(id), 'token', 'next')
  if f[1] and f[1] ~= '' and tonumber(f[2]) > now then leased = leased + 1 end
end
return {redis.call('ZCARD', P .. 'all'), redis.call('SCARD', P .. 'held'), leased,
        redis.call('GET', P .. 'recipients') or '0', redis.call('HGETALL', P .. 'routes')}
""")

# ARGV: prefix, now.  Returns {heartbeats as HGETALL gives them,
# {node, leased count, ...}, {node, reserved count, ...}}.
_NODES = _script("""
local now, leased = tonumber(ARGV[2]), {}
for _, id in ipairs(redis.call('SMEMBERS', P .. 'leased')) do
  local f = redis.call('HMGET', ekey(id), 'token', 'next', 'lnode')
  if f[1] and f[1] ~= '' and f[3] and tonumber(f[2]) > now then
    leased[f[3]] = (leased[f[3]] or 0) + 1
  end
end
local held, reserved = {}, {}
for node, n in pairs(leased) do table.insert(held, node); table.insert(held, n) end
for _, node in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
  table.insert(reserved, node)
  table.insert(reserved, redis.call('ZCARD', dkey(node)))
end
return {redis.call('HGETALL', P .. 'heartbeats'), held, reserved}
""")

# ARGV: prefix, start, stop.  Returns {data, next, node, held} per entry.
_PAGE_SCRIPT = _script("""
local out = {}
for _, id in ipairs(redis.call('ZRANGE', P .. 'all', ARGV[2], ARGV[3])) do
  table.insert(out, redis.call('HMGET', ekey(id), 'data', 'next', 'node', 'held'))
end
return out
""")


# ARGV: prefix, route, node, want, holding, limit, now, expires (now + ttl).
# Returns the share given.  What mailhub.model.fair_share computes in Python,
# computed here so that reading the others' shares and writing this one are
# one step: expired shares dropped, then max(holding, min(want, fair, free)).
# Names are ordered by their bytes, as Python orders str (Lua's < on strings
# would follow the server's locale).  A share of 0 wanting 0 counts for
# nothing, so it is dropped rather than kept: an idle route holds no key.
_SHARE = _script("""
local key, node = P .. 'shares:' .. ARGV[2], ARGV[3]
local want, holding, limit = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now, expires = tonumber(ARGV[7]), ARGV[8]
local function before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local others, wants = 0, {{node, want}}
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local name = all[i]
  if name ~= node then
    local given, wanted, until_ = string.match(all[i + 1], '^(%S+) (%S+) (%S+)$')
    if tonumber(until_) <= now then
      redis.call('HDEL', key, name)
    else
      others = others + tonumber(given)
      table.insert(wants, {name, tonumber(wanted)})
    end
  end
end
-- Max-min fairness: fill the smallest wants first (by want, then name);
-- once every node left wants more than an equal part of what is left, each
-- gets that part, the remainder one each to the first of them by name.
local left, pending, fair = math.max(0, limit), {}, {}
for _, w in ipairs(wants) do
  if w[2] > 0 then table.insert(pending, w) end
end
table.sort(pending, function(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  return before(a[1], b[1])
end)
local i = 1
while i <= #pending do
  local count = #pending - i + 1
  local equal = math.floor(left / count)
  if pending[i][2] <= equal then
    fair[pending[i][1]] = pending[i][2]
    left = left - pending[i][2]
    i = i + 1
  else
    local extra, names = left - equal * count, {}
    for j = i, #pending do table.insert(names, pending[j][1]) end
    table.sort(names, before)
    for j, name in ipairs(names) do
      if j <= extra then fair[name] = equal + 1 else fair[name] = equal end
    end
    break
  end
end
local mine = math.min(fair[node] or 0, math.max(0, want))
local given = math.max(holding, math.min(want, mine, limit - others))
if given == 0 and want == 0 then
  redis.call('HDEL', key, node)
else
  redis.call('HSET', key, node, string.format('%d %d %s', given, want, expires))
end
return given
""")

# ARGV: prefix, route, '1' to set | '0' to clear, the state's JSON.
_SET_ROUTE_STATE = _script("""
if ARGV[3] == '1' then
  redis.call('HSET', P .. 'route_states', ARGV[2], ARGV[4])
else
  redis.call('HDEL', P .. 'route_states', ARGV[2])
end
return 1
""")


# -- serialisation ----------------------------------------------------------


@functools.cache
def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def _num(value: float) -> str:
    """A time as a string that reads back as exactly the same float."""
    return repr(float(value))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _address_json(a: Address | None) -> list[str] | None:
    return None if a is None else [a.local, a.domain]


def _address(data: list[str] | None) -> Address | None:
    return None if data is None else Address(data[0], data[1])


def _reply_json(r: Reply | None) -> list[Any] | None:
    return None if r is None else [r.code, r.enhanced, r.text]


def _reply(data: list[Any] | None) -> Reply | None:
    return None if data is None else Reply(data[0], data[1], data[2])


def _new_id() -> str:
    return uuid.uuid4().hex



def _entry_json(e: Entry) -> str:
    """The parts of an entry the scripts never look into."""
    return json.dumps(
        {
            "id": e.id,
            "mid": e.message_id,
            "route": e.route,
            "sender": _address_json(e.sender),
            "rcpt": [
                [_address_json(r.address), r.state.value, _reply_json(r.reply)]
                for r in e.recipients
            ],
            "created": e.created,
            "attempts": e.attempts,
            "size": e.size,
            "helo": e.envelope_helo,
            "client": e.envelope_client,
            "utf8": e.smtputf8,
        }
    )


def _entry(data: bytes, next_attempt: bytes, node: bytes, held: bytes) -> Entry:
    d = json.loads(data)
    return Entry(
        id=d["id"],
        message_id=d["mid"],
        route=d["route"],
        sender=_address(d["sender"]),
        recipients=tuple(
            Recipient(_address(a), RecipientState(s), _reply(r))  # type: ignore[arg-type]
            for a, s, r in d["rcpt"]
        ),
        created=d["created"],
        next_attempt=float(next_attempt),
        node=_text(node) or None,
        attempts=d["attempts"],
        held=held == b"1",
        size=d["size"],
        envelope_helo=d["helo"],
        envelope_client=d["client"],
        smtputf8=bool(d.get("utf8", False)),
    )


def _attempt_json(a: Attempt) -> str:
    return json.dumps(
        {
            "entry": a.entry_id,
            "node": a.node,
            "started": a.started,
            "finished": a.finished,
            "replies": [[_address_json(addr), _reply_json(r)] for addr, r in a.replies],
        }
    )


def _attempt(data: bytes) -> Attempt:
    d = json.loads(data)
    return Attempt(
        d["entry"],
        d["node"],
        d["started"],
        d["finished"],
        tuple((Address(addr[0], addr[1]), Reply(r[0], r[1], r[2])) for addr, r in d["replies"]),
    )


def _matches(e: Entry, f: EntryFilter) -> bool:
    if f.route is not None and e.route != f.route:
        return False
    if f.held is not None and e.held != f.held:
        return False
    if f.recipient is not None:
        wanted = f.recipient.lower()
        if not any(str(r.address).lower() == wanted for r in e.recipients):
            return False
    return True


# -- the store --------------------------------------------------------------


class _OneTurn:
    """
    The calls of one kind made in one turn of the reactor, sent to Redis
    together: ``send(items)`` makes one call for all of them, whose list
    result gives each its own answer (or whose failure fails them all).  In
    a drain, deliveries end and bodies are read ahead many at a time, and
    every call to Redis costs the reactor thread a reply to parse and a
    timeout to arm.
    """

    def __init__(self, reactor: Any, send: Callable[[list[Any]], Deferred[list[Any]]]) -> None:
        self._reactor = reactor
        self._send = send
        self._pending: list[tuple[Any, Deferred[Any]]] = []

    def add(self, item: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._pending.append((item, d))
        if len(self._pending) == 1:
            self._reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        pending, self._pending = self._pending, []

        def answered(results: list[Any]) -> None:
            for (_, each), result in zip(pending, results, strict=True):
                each.callback(result)

        def failed(failure: Failure) -> None:
            for _, each in pending:
                each.errback(failure)

        self._send([item for item, _ in pending]).addCallbacks(answered, failed)


@implementer(ISpoolStore, INodeRegistry, IRouteCoordination, ILeaseReclaim)
@define
class RedisSpoolStore:
    """
    An ``ISpoolStore`` in Redis.

    :ivar _redis: a txredisapi connection handler (``charset=None``,
        ``convertNumbers=False``: bulk replies are ``bytes``).
    :ivar _reactor: ``IReactorTime`` for command timeouts and ``counts()``.
    :ivar _prefix: prepended to every key.
    :ivar _timeout: seconds any one call may take before it fails with
        ``StoreUnavailable``.
    :ivar _wait_replicas: replicas ``WAIT`` must confirm after a write; 0 for none.
    :ivar _max_spool_bytes: the spool's message bytes limit; 0 for none.
    :ivar _disconnect: closes the connections (and Sentinel's).
    """

    _redis: Any
    _reactor: Any
    _prefix: str = DEFAULT_PREFIX
    _timeout: float = DEFAULT_COMMAND_TIMEOUT
    _wait_replicas: int = 0
    _max_spool_bytes: int = 0
    _disconnect: Callable[[], Deferred[Any]] = field(default=lambda: succeed(None))
    _records: _OneTurn = field(init=False)
    _bodies: _OneTurn = field(init=False)
    #: node -> the incarnation its leases are held under (``ILeaseReclaim``)
    _incarnations: dict[str, str] = field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self._records = _OneTurn(self._reactor, self._send_records)
        self._bodies = _OneTurn(self._reactor, self._read_bodies)

    # -- plumbing -------------------------------------------------------

    def _unavailable(self, failure: Failure, what: str) -> Failure:
        if failure.check(StoreUnavailable):
            return failure
        if failure.check(TimeoutError):
            return Failure(
                StoreUnavailable(f"redis: {what} got no answer within {self._timeout:g}s")
            )
        error = failure.value
        sub = getattr(error, "subFailure", None)  # a pipeline's FirstError
        if sub is not None:
            error = sub.value
        if str(error).startswith("OOM"):
            return Failure(StoreFull(f"redis: {what}: {error}"))
        return Failure(StoreUnavailable(f"redis: {what}: {error}"))

    def _guard(self, d: Deferred[_T], what: str) -> Deferred[_T]:
        """Bound ``d`` by the command timeout and turn any failure into ``StoreUnavailable``."""
        d.addTimeout(self._timeout, self._reactor)
        return d.addErrback(self._unavailable, what)

    def _eval(self, script: str, what: str, *args: str | bytes | int) -> Deferred[Any]:
        """
        Run a script by its SHA1, sending its text only when Redis does not
        know it yet (txredisapi's own ``eval`` fallback is broken).
        """
        execute = self._redis.execute_command

        def unknown(failure: Failure) -> Any:
            if str(failure.value).startswith("NOSCRIPT"):
                return execute("EVAL", script, 0, self._prefix, *args)
            return failure

        try:
            d = execute("EVALSHA", _sha1(script), 0, self._prefix, *args)
        except Exception:
            d = fail()
        return self._guard(d.addErrback(unknown), what)

    def _command(self, what: str, *args: str | bytes | int) -> Deferred[Any]:
        try:
            d = self._redis.execute_command(*args)
        except Exception:
            d = fail()
        return self._guard(d, what)

    def _eval_replicated(self, script: str, what: str, *args: str | bytes | int) -> Deferred[Any]:
        """
        Run a script that writes and, with ``wait_replicas``, ``WAIT`` for its
        replication on the same connection (``WAIT`` covers only the writes of
        the connection that sends it).
        """
        if not self._wait_replicas:
            return self._eval(script, what, *args)
        wait_ms = max(1, int(self._timeout * 500))

        async def run() -> Any:
            conn = await self._redis.pipeline()
            # EVAL, not EVALSHA: a NOSCRIPT retry would come after the WAIT.
            conn.execute_command("EVAL", script, 0, self._prefix, *args)
            conn.execute_command("WAIT", self._wait_replicas, wait_ms)
            result, acked = await conn.execute_pipeline()
            if acked < self._wait_replicas:
                raise StoreUnavailable(
                    f"redis: {what}: {acked} of {self._wait_replicas} replicas"
                    f" confirmed the write within {wait_ms} ms"
                )
            return result

        return self._guard(ensureDeferred(run()), what)

    # -- ISpoolStore ----------------------------------------------------

    def enqueue(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
    ) -> Deferred[list[str]]:
        d = self._enqueue(envelope, message, routes, node, None, None)
        return d.addCallback(lambda stored: [cast(Entry, e).id for e in stored])

    def enqueue_leased(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
        lease_seconds: float,
        decided: Mapping[str, tuple[Attempt, Decision]] | None = None,
    ) -> Deferred[list[Lease | Entry]]:
        lease = (uuid.uuid4().hex, envelope.received_at + lease_seconds)
        return self._enqueue(envelope, message, routes, node, lease, decided)

    def _enqueue(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
        lease: tuple[str, float] | None,
        decided: Mapping[str, tuple[Attempt, Decision]] | None,
    ) -> Deferred[list[Lease | Entry]]:
        if not routes:
            return succeed([])
        message = bytes(message)
        message_id = uuid.uuid4().hex
        entries = new_entries(envelope, len(message), routes, node, message_id, _new_id)
        ids = [e.id for e in entries]
        args: list[str | bytes | int] = [
            str(self._max_spool_bytes),
            message_id,
            message,
            len(message),
            node,
            self._incarnations.get(node, ""),
            len(routes),
        ]
        results: list[Lease | Entry] = []
        for i, entry in enumerate(entries, 1):
            if decided and entry.route in decided:
                attempt, decision = decided[entry.route]
                after = apply_decision(entry, decision)
                results.append(after)
                args += [entry.id, entry.route, _entry_json(after), len(after.pending),
                         _num(after.next_attempt), after.node or "", "",
                         _attempt_json(evolve(attempt, entry_id=entry.id))]
            elif lease is not None:
                token = f"{lease[0]}.{i}"
                results.append(Lease(entry, node, token, lease[1]))
                args += [entry.id, entry.route, _entry_json(entry), len(entry.recipients),
                         _num(lease[1]), "", token, ""]
            else:
                results.append(entry)
                args += [entry.id, entry.route, _entry_json(entry), len(entry.recipients),
                         _num(entry.next_attempt), node, "", ""]

        def stored(n: int) -> list[Lease | Entry]:
            if n < 0:
                raise StoreFull(f"redis: the spool holds max_spool_bytes={self._max_spool_bytes}")
            return results

        def not_undone(failure: Failure, entry_id: str) -> None:
            _log.warn(
                "could not take back unconfirmed entry {entry}: {why}",
                entry=entry_id,
                why=failure.getErrorMessage(),
            )

        def undo(failure: Failure) -> Failure:
            # The write may have reached the master even though WAIT did not
            # confirm it: the client is told 4xx and sends the message again,
            # so take this copy back (best effort; at worst a duplicate).
            if self._wait_replicas and failure.check(StoreUnavailable):
                for entry_id in ids:
                    self._eval(_DELETE, "undo enqueue", entry_id).addErrback(not_undone, entry_id)
            return failure

        d = self._eval_replicated(_ENQUEUE, "enqueue", *args)
        return d.addCallbacks(stored, undo)

    def claim(
        self,
        node: str,
        now: float,
        limit: int,
        lease_seconds: float,
        takeover_seconds: float,
        ids: Iterable[str] | None = None,
    ) -> Deferred[list[Lease]]:
        expires = now + lease_seconds
        args: list[str | bytes | int] = [
            node,
            _num(now),
            max(0, int(limit)),
            _num(expires),
            _num(takeover_seconds),
            uuid.uuid4().hex,
            self._incarnations.get(node, ""),
        ]
        if ids is None:
            args.append("due")
        else:
            args.append("ids")
            args += list(dict.fromkeys(ids))

        def leases(rows: list[list[bytes]]) -> list[Lease]:
            return [
                Lease(_entry(data, nxt, owner, held), node, _text(token), expires)
                for _id, token, data, nxt, owner, held in rows
            ]

        return self._eval(_CLAIM, "claim", *args).addCallback(leases)

    def body(self, message_id: str) -> Deferred[bytes]:
        def found(body: bytes | None) -> bytes:
            if body is None:
                raise KeyError(message_id)
            return body

        return self._bodies.add(message_id).addCallback(found)

    def _read_bodies(self, message_ids: list[str]) -> Deferred[list[bytes | None]]:
        """The bodies asked for in one turn of the reactor (a claimed batch's), in one script."""
        return self._eval(_BODIES, "body", *message_ids)

    def record(self, lease: Lease, attempt: Attempt, decision: Decision) -> Deferred[Entry | None]:
        entry = apply_decision(lease.entry, decision)

        def done(result: int) -> Entry | None:
            if result < 0:
                raise LeaseLost(lease.entry.id)
            if result == 0:
                return None
            return evolve(entry, held=result == 2)

        args = (
            entry.id,
            lease.token,
            _entry_json(entry),
            _num(entry.next_attempt),
            entry.node or "",
            len(entry.pending),
            "1" if entry.held else "0",
            _attempt_json(attempt),
        )
        return self._records.add(args).addCallback(done)

    def _send_records(self, records: list[tuple[str | int, ...]]) -> Deferred[list[int]]:
        """The records made in one turn of the reactor, in one script."""
        return self._eval_replicated(
            _RECORD_MANY, "record", len(records), *(a for args in records for a in args)
        )

    def release(self, lease: Lease, now: float) -> Deferred[None]:
        d = self._eval(_RELEASE, "release", lease.entry.id, lease.token, _num(now))
        return d.addCallback(lambda _: None)

    def next_due(
        self, node: str, now: float, takeover_seconds: float = 0.0
    ) -> Deferred[float | None]:
        def due(result: list[Any] | None) -> float | None:
            if not result:
                return None
            score, other = result
            return float(score) + (takeover_seconds if other else 0.0)

        return self._eval(_NEXT_DUE, "next_due", node, _num(takeover_seconds)).addCallback(due)

    def get(self, entry_id: str) -> Deferred[Entry | None]:
        def found(f: list[bytes | None]) -> Entry | None:
            if f[0] is None:
                return None
            return _entry(*f)  # type: ignore[arg-type]

        key = f"{self._prefix}e:{entry_id}"
        d = self._command("get", "HMGET", key, "data", "next", "node", "held")
        return d.addCallback(found)

    def attempts(self, entry_id: str) -> Deferred[list[Attempt]]:
        key = f"{self._prefix}a:{entry_id}"
        d = self._command("attempts", "LRANGE", key, 0, -1)
        return d.addCallback(lambda rows: [_attempt(r) for r in rows or []])

    def _page(self, start: int, stop: int) -> Deferred[list[Entry]]:
        d = self._eval(_PAGE_SCRIPT, "entries", start, stop)
        return d.addCallback(lambda rows: [_entry(*row) for row in rows if row[0] is not None])

    def entries(
        self, filter: EntryFilter | None = None, offset: int = 0, limit: int = 100
    ) -> Deferred[list[Entry]]:
        if limit <= 0:
            return succeed([])
        if filter is None:
            return self._page(offset, offset + limit - 1)
        wanted = filter

        async def scan() -> list[Entry]:
            found: list[Entry] = []
            start = 0
            while len(found) < offset + limit:
                page = await self._page(start, start + _PAGE - 1)
                found += [e for e in page if _matches(e, wanted)]
                if len(page) < _PAGE:
                    break
                start += _PAGE
            return found[offset : offset + limit]

        return ensureDeferred(scan())

    def counts(self) -> Deferred[dict[str, Any]]:
        def report(r: list[Any]) -> dict[str, Any]:
            entries, held, leased, recipients, routes = r
            return {
                "entries": int(entries),
                "held": int(held),
                "leased": int(leased),
                "recipients": int(recipients),
                "routes": {
                    _text(k): int(v) for k, v in zip(routes[::2], routes[1::2], strict=True)
                },
            }

        d = self._eval(_COUNTS, "counts", _num(self._reactor.seconds()))
        return d.addCallback(report)

    def hold(self, entry_id: str) -> Deferred[bool]:
        return self._eval(_HOLD, "hold", entry_id).addCallback(bool)

    def release_held(self, entry_id: str, now: float) -> Deferred[bool]:
        return self._eval(_RELEASE_HELD, "release_held", entry_id, _num(now)).addCallback(bool)

    def flush(self, route: str | None, now: float) -> Deferred[int]:
        d = self._eval(_FLUSH, "flush", "0" if route is None else "1", route or "", _num(now))
        return d.addCallback(int)

    def delete(self, entry_id: str) -> Deferred[bool]:
        return self._eval(_DELETE, "delete", entry_id).addCallback(bool)

    # -- ILeaseReclaim -----------------------------------------------------

    def reclaim(self, node: str, incarnation: str, now: float) -> Deferred[int]:
        self._incarnations[node] = incarnation
        d = self._eval_replicated(_RECLAIM, "reclaim", node, incarnation, _num(now))
        return d.addCallback(int)

    # -- INodeRegistry -----------------------------------------------------

    def heartbeat(self, node: str, now: float, info: Mapping[str, Any]) -> Deferred[None]:
        value = json.dumps({"last_seen": now, "info": dict(info)})
        d = self._command("heartbeat", "HSET", f"{self._prefix}heartbeats", node, value)
        return d.addCallback(lambda _: None)

    def nodes(self, now: float) -> Deferred[list[dict[str, Any]]]:
        def report(r: list[Any]) -> list[dict[str, Any]]:
            beats, leased, reserved = r
            found: dict[str, dict[str, Any]] = {}

            def of(name: bytes) -> dict[str, Any]:
                key = _text(name)
                return found.setdefault(
                    key, {"name": key, "last_seen": None, "info": {}, "leased": 0, "reserved": 0}
                )

            for name, value in zip(beats[::2], beats[1::2], strict=True):
                beat = json.loads(value)
                of(name).update(last_seen=beat["last_seen"], info=beat["info"])
            for name, n in zip(leased[::2], leased[1::2], strict=True):
                of(name)["leased"] = int(n)
            for name, n in zip(reserved[::2], reserved[1::2], strict=True):
                of(name)["reserved"] = int(n)
            return [found[name] for name in sorted(found)]

        return self._eval(_NODES, "nodes", _num(now)).addCallback(report)

    # -- IRouteCoordination -----------------------------------------------

    def share(
        self, route: str, node: str, want: int, holding: int, limit: int, now: float, ttl: float
    ) -> Deferred[int]:
        # Not replicated before it fires: a share lasts ttl seconds and is
        # asked for again; a failover that loses one loses only that.
        d = self._eval(
            _SHARE, "share", route, node, int(want), int(holding), int(limit), _num(now),
            _num(now + ttl),
        )
        return d.addCallback(int)

    def route_states(self) -> Deferred[dict[str, dict[str, Any]]]:
        def report(r: list[bytes]) -> dict[str, dict[str, Any]]:
            return {_text(k): json.loads(v) for k, v in zip(r[::2], r[1::2], strict=True)}

        d = self._command("route_states", "HGETALL", f"{self._prefix}route_states")
        return d.addCallback(report)

    def set_route_state(self, route: str, state: Mapping[str, Any] | None) -> Deferred[None]:
        if state is None:
            args: tuple[str, ...] = (route, "0", "")
        else:
            try:
                args = (route, "1", json.dumps(dict(state)))
            except (TypeError, ValueError):
                return fail()
        d = self._eval_replicated(_SET_ROUTE_STATE, "set_route_state", *args)
        return d.addCallback(lambda _: None)

    def close(self) -> Deferred[None]:
        d = self._disconnect()
        d.addTimeout(self._timeout, self._reactor)
        return d.addBoth(lambda _: None)


# -- connecting -------------------------------------------------------------


def _connect(settings: _Settings, reactor: Any) -> tuple[Any, Callable[[], Deferred[Any]]]:
    """
    Open a lazy, self-reconnecting connection pool: commands issued before it
    is up wait for it (bounded by the store's command timeout).

    :returns: the txredisapi handler and a function that closes everything.
    """
    import txredisapi  # installs the default reactor: only here, never at discovery

    plain_factory, sentinel_factory = _factories(txredisapi, settings.reconnect_max_delay)

    options = dict(
        charset=None,
        password=settings.password,
        replyTimeout=settings.command_timeout,
        convertNumbers=False,
        username=settings.username,
    )
    if settings.sentinels:
        sentinel = txredisapi.Sentinel(settings.sentinels)
        # Sentinels answer in milliseconds; by default a lookup made while no
        # master is fit (just after it died) waits 10 s before trying again.
        sentinel.discovery_timeout = min(1.0, settings.command_timeout)
        handler = sentinel.master_for(
            settings.master,
            factory_class=sentinel_factory,
            dbid=settings.db,
            poolsize=settings.pool_size,
            **options,
        )

        def close_sentinel() -> Deferred[Any]:
            return _gather([handler.disconnect(), sentinel.disconnect()])

        return handler, close_sentinel

    from twisted.internet.endpoints import HostnameEndpoint

    factory = plain_factory(
        f"{settings.host}:{settings.port}",
        settings.db,
        settings.pool_size,
        isLazy=True,
        handler=txredisapi.ConnectionHandler,
        **options,
    )
    factory.startConnecting(
        HostnameEndpoint(reactor, settings.host, settings.port, timeout=settings.command_timeout)
    )
    return factory.handler, factory.disconnect


def _gather(ds: list[Deferred[Any]]) -> Deferred[Any]:
    from twisted.internet.defer import gatherResults

    return gatherResults(ds, consumeErrors=True)


def _factories(txredisapi: Any, max_delay: float) -> tuple[Any, Any]:
    """
    txredisapi's connection factories (plain and Sentinel), fixed for a
    store that must never give up reconnecting:

    - txredisapi stops reconnecting *for good* when ``AUTH`` or ``SELECT``
      fails on a new connection, and a timeout counts: a Redis that accepts
      connections but does not answer (frozen, overloaded) would leave the
      node without a spool until it is restarted.  Here ``stopTrying`` does
      nothing; ``close()`` uses ``disconnect()``, which stops for real.
      Such failures are logged, not handed to a ``Deferred`` nobody watches.
    - The Sentinel protocol compares the ``ROLE`` reply with ``"master"``,
      but with ``charset=None`` the reply is ``bytes``, so it would drop
      every connection to the master.
    """

    def keep_trying(self: Any) -> Deferred[None]:
        return succeed(None)

    def log_error(self: Any, why: str) -> None:
        _log.warn("{why}; reconnecting", why=why)

    class Factory(txredisapi.RedisFactory):  # type: ignore[misc, name-defined]
        maxDelay = max_delay
        stopTrying = keep_trying
        connectionError = log_error

    class SentinelProtocol(txredisapi.SentinelRedisProtocol):  # type: ignore[misc, name-defined]
        def connectionMade(self) -> Any:
            def check_role(role: list[Any]) -> Any:
                if self.factory.is_master and _text(role[0]) != "master":
                    self.transport.loseConnection()
                    return None
                return txredisapi.RedisProtocol.connectionMade(self)

            def failed(_: Failure) -> None:
                self.transport.abortConnection()

            if self.password is not None:
                self.auth(self.password, self.username).addErrback(lambda _: None)
            return self.role().addCallbacks(check_role, failed)

    class SentinelFactory(txredisapi.SentinelConnectionFactory):  # type: ignore[misc, name-defined]
        protocol = SentinelProtocol
        maxDelay = max_delay
        stopTrying = keep_trying
        connectionError = log_error

    return Factory, SentinelFactory


# -- configuration ----------------------------------------------------------


@frozen
class _Settings:
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str | None = None
    username: str | None = None
    key_prefix: str = DEFAULT_PREFIX
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    wait_replicas: int = 0
    max_spool_bytes: int = 0
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    pool_size: int = DEFAULT_POOL_SIZE
    reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY


def _integer(config: Mapping[str, Any], key: str, default: int, least: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"store.{key}: must be a whole number, {least} or more")
    return value


def _seconds(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"store.{key}: must be a number of seconds, more than 0")
    return float(value)


def _string(config: Mapping[str, Any], key: str, default: str | None) -> str | None:
    value = config.get(key, default)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"store.{key}: must be a string")
    return value


def _host_port(text: Any, key: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not isinstance(text, str) or not sep or not host or not port.isdigit():
        raise ValueError(f"store.{key}: {text!r} is not 'host:port'")
    return host.strip("[]"), int(port)


def _settings(config: Mapping[str, Any]) -> _Settings:
    host = _string(config, "host", "127.0.0.1")
    port = _integer(config, "port", 6379, 1)
    db = _integer(config, "db", 0, 0)
    password = _string(config, "password", None)
    username = _string(config, "username", None)
    url = _string(config, "url", None)
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError(f"store.url: {url!r} is not 'redis://[:password@]host[:port][/db]'")
        host = parts.hostname
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"store.url: {url!r} has a bad port")
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"store.url: {url!r}: the database must be a number")
            db = int(path)
        if parts.password is not None:
            password = unquote(parts.password)
            username = unquote(parts.username) if parts.username else username
    if port > 65535:
        raise ValueError("store.port: must be a TCP port number")
    prefix = _string(config, "key_prefix", DEFAULT_PREFIX)
    if not prefix:
        raise ValueError("store.key_prefix: must not be empty")
    sentinels_raw = config.get("sentinels", [])
    if isinstance(sentinels_raw, str) or not isinstance(sentinels_raw, list | tuple):
        raise ValueError("store.sentinels: must be a list of 'host:port'")
    sentinels = tuple(_host_port(s, "sentinels") for s in sentinels_raw)
    master = _string(config, "master", "") or ""
    if sentinels and not master:
        raise ValueError("store.master: the Sentinel master's name is needed with sentinels")
    return _Settings(
        host=host or "127.0.0.1",
        port=port,
        db=db,
        password=password,
        username=username,
        key_prefix=prefix,
        command_timeout=_seconds(config, "command_timeout", DEFAULT_COMMAND_TIMEOUT),
        wait_replicas=_integer(config, "wait_replicas", 0, 0),
        max_spool_bytes=_integer(config, "max_spool_bytes", 0, 0),
        sentinels=sentinels,
        master=master,
        pool_size=_integer(config, "pool_size", DEFAULT_POOL_SIZE, 1),
        reconnect_max_delay=_seconds(config, "reconnect_max_delay", DEFAULT_RECONNECT_MAX_DELAY),
    )


@implementer(IStorePlugin)
@frozen
class RedisStorePlugin:
    """Makes a ``RedisSpoolStore`` from the ``[store]`` table (see the module docstring)."""

    name: str = "redis"
    #: The keys of ``[store]`` besides ``plugin`` (``mailhub.plugin``).
    config_keys: frozenset[str] = frozenset({
        "host", "port", "db", "url", "password", "username", "key_prefix", "command_timeout",
        "wait_replicas", "max_spool_bytes", "sentinels", "master", "pool_size", "reconnect_max_delay",
    })

    def check_config(self, config: Mapping[str, Any]) -> None:
        """
        Check the ``[store]`` table as ``make`` does, without connecting.

        :raises ValueError: naming the key at fault.
        """
        _settings(config)

    def make(self, config: Mapping[str, Any], reactor: Any) -> RedisSpoolStore:
        """
        Check the configuration and start connecting; the store is usable at
        once (calls wait for the connection, up to ``command_timeout``).

        :param config: the ``[store]`` table.
        :param reactor: a running reactor: time, timeouts, TCP.
        :raises ValueError: naming the key, when the configuration is wrong.
        """
        settings = _settings(config)
        redis, disconnect = _connect(settings, reactor)
        return RedisSpoolStore(
            redis,
            reactor,
            settings.key_prefix,
            settings.command_timeout,
            settings.wait_replicas,
            settings.max_spool_bytes,
            disconnect,
        )


plugin = RedisStorePlugin()
