-- ARGV: prefix, start, stop.  Returns {data, next, node, held} per entry.
local out = {}
for _, id in ipairs(redis.call('ZRANGE', P .. 'all', ARGV[2], ARGV[3])) do
  table.insert(out, redis.call('HMGET', ekey(id), 'data', 'next', 'node', 'held'))
end
return out
