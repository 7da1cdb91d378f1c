-- ARGV: prefix, max_bytes, message_id, body, size, lease node, lease
--       incarnation, n, then per entry: id, route, data, pending, next, node,
--       lease token ('' for none), attempt ('' for none).
-- A leased entry is stored as claim.lua leaves one; one with an attempt as
-- record.lua leaves one after it.  Returns the number of entries, or -1 (and
-- writes nothing) when full.
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
