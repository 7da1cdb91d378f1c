-- ARGV: prefix, id, now, new route ('' to keep it), the entry's data as read,
-- its data with the new route.  Returns 0 missing, 1 leased, 2 changed since
-- read (read again), 3 requeued.  The data is rewritten in Python, which
-- keeps its times exact (Lua's cjson would round them).
local id, k, now = ARGV[2], ekey(ARGV[2]), ARGV[3]
local f = redis.call('HMGET', k, 'node', 'held', 'next', 'token', 'route', 'data')
if not f[6] then return 0 end
if f[4] and f[4] ~= '' and tonumber(f[3]) > tonumber(now) then return 1 end
if ARGV[4] ~= '' then
  if f[6] ~= ARGV[5] then return 2 end
  redis.call('HSET', k, 'data', ARGV[6], 'route', ARGV[4])
  if redis.call('HINCRBY', P .. 'routes', f[5], -1) <= 0 then
    redis.call('HDEL', P .. 'routes', f[5])
  end
  redis.call('HINCRBY', P .. 'routes', ARGV[4], 1)
end
unschedule(id, f[1])
redis.call('HSET', k, 'next', now, 'node', '', 'token', '')
redis.call('SREM', P .. 'leased', id)
schedule(id, '', now, f[2])
return 3
