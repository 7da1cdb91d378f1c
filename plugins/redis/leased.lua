-- ARGV: prefix, now.  Returns the ids of the entries under a live lease.
local now, out = tonumber(ARGV[2]), {}
for _, id in ipairs(redis.call('SMEMBERS', P .. 'leased')) do
  local f = redis.call('HMGET', ekey(id), 'token', 'next')
  if f[1] and f[1] ~= '' and tonumber(f[2]) > now then table.insert(out, id) end
end
return out
