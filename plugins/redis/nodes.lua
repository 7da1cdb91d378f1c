-- ARGV: prefix, now.  Returns {heartbeats as HGETALL gives them,
-- {node, leased count, ...}, {node, reserved count, ...}}.
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
