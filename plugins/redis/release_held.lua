-- ARGV: prefix, id, now.  A held entry still under lease stays due at its
-- lease's expiry, so releasing it never hands it to a second node.
local id, k = ARGV[2], ekey(ARGV[2])
local f = redis.call('HMGET', k, 'node', 'held', 'next', 'token')
if not f[1] then return 0 end
if f[2] == '1' then
  local nxt = ARGV[3]
  if f[4] ~= '' and tonumber(f[3]) > tonumber(ARGV[3]) then nxt = f[3] end
  unschedule(id, f[1])
  redis.call('HSET', k, 'held', '0', 'next', nxt, 'node', '')
  schedule(id, '', nxt, '0')
end
return 1
