-- ARGV: prefix, id.
local id, k = ARGV[2], ekey(ARGV[2])
local f = redis.call('HMGET', k, 'node', 'held', 'next')
if not f[1] then return 0 end
if f[2] ~= '1' then
  unschedule(id, f[1])
  redis.call('HSET', k, 'held', '1')
  schedule(id, f[1], f[3], '1')
end
return 1
