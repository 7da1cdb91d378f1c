-- ARGV: prefix, id, token, now.
local id, k = ARGV[2], ekey(ARGV[2])
local f = redis.call('HMGET', k, 'token', 'node', 'held')
if not f[1] or f[1] ~= ARGV[3] then return 0 end
unschedule(id, f[2])
redis.call('HSET', k, 'next', ARGV[4], 'node', '', 'token', '')
redis.call('SREM', P .. 'leased', id)
schedule(id, '', ARGV[4], f[3])
return 1
