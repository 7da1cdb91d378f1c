-- The prelude of every script of the redis store (mailhub.plugins.redis.scripts).
-- ARGV[1] is always the key prefix.  Times travel as the decimal strings
-- Python's repr() makes, and are stored as given: Lua's tostring() would round
-- them to 14 digits.
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
