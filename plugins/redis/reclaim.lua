-- ARGV: prefix, node, incarnation, now.  Entries leased to the node under
-- another incarnation (or none: '') are due now, reserved for it.  Returns
-- how many.
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
