-- ARGV: prefix, '1' to match the route | '0' for all, route, now.
local now, n = tonumber(ARGV[4]), 0
local owners = {''}
for _, owner in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do table.insert(owners, owner) end
for _, owner in ipairs(owners) do
  for _, id in ipairs(redis.call('ZRANGE', dkey(owner), 0, -1)) do
    local f = redis.call('HMGET', ekey(id), 'route', 'next', 'token', 'data')
    local t = tonumber(f[2])
    local leased = f[3] ~= '' and t > now
    if not leased and (ARGV[2] == '0' or f[1] == ARGV[3]) then
      -- Due oldest first: the earliest of its next attempt, its creation and now.
      local created = tonumber(cjson.decode(f[4])['created'])
      local nxt = f[2]
      if t > now or created < t then
        nxt = string.format('%.6f', math.min(t, created, now))
      end
      unschedule(id, owner)
      redis.call('HSET', ekey(id), 'next', nxt, 'node', '')
      schedule(id, '', nxt, '0')
      n = n + 1
    end
  end
end
return n
