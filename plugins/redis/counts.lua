-- ARGV: prefix, now.
local now, leased = tonumber(ARGV[2]), 0
for _, id in ipairs(redis.call('SMEMBERS', P .. 'leased')) do
  local f = redis.call('HMGET', ekey(id), 'token', 'next')
  if f[1] and f[1] ~= '' and tonumber(f[2]) > now then leased = leased + 1 end
end
return {redis.call('ZCARD', P .. 'all'), redis.call('SCARD', P .. 'held'), leased,
        redis.call('GET', P .. 'recipients') or '0', redis.call('HGETALL', P .. 'routes')}
