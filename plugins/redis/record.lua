-- ARGV: prefix, id, token, data, next, node, pending, hold, attempt.
-- Returns -1 lease lost, 0 entry gone, 1 kept, 2 kept and held.
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
