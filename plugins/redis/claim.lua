-- ARGV: prefix, node, now, limit, expires, takeover, token base, the node's
--       incarnation, 'ids' | 'due', then the ids.  Returns {id, token, data,
--       next, node, held} per lease.
local node, now, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local expires, takeover, base, linc = ARGV[5], tonumber(ARGV[6]), ARGV[7], ARGV[8]
local found = {}
local function consider(id, nxt, owner)
  local t = tonumber(nxt)
  if owner ~= '' and owner ~= node then
    if t + takeover > now then return end
  elseif t > now then return end
  table.insert(found, {id, t})
end
if ARGV[9] == 'ids' then
  for i = 10, #ARGV do
    local f = redis.call('HMGET', ekey(ARGV[i]), 'next', 'node', 'held')
    if f[1] and f[3] == '0' then consider(ARGV[i], f[1], f[2]) end
  end
else
  local function take(owner, upto)
    local r = redis.call('ZRANGEBYSCORE', dkey(owner), '-inf', upto,
                         'WITHSCORES', 'LIMIT', 0, limit)
    for i = 1, #r, 2 do consider(r[i], r[i + 1], owner) end
  end
  take('', now)
  for _, owner in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
    if owner == node then take(owner, now) else take(owner, now - takeover) end
  end
end
table.sort(found, function(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  return a[1] < b[1]
end)
local out = {}
for i = 1, math.min(limit, #found) do
  local id = found[i][1]
  local f = redis.call('HMGET', ekey(id), 'data', 'next', 'node', 'held')
  local token = base .. '.' .. i
  unschedule(id, f[3])
  redis.call('HSET', ekey(id), 'next', expires, 'node', '', 'token', token, 'lnode', node,
             'linc', linc)
  redis.call('SADD', P .. 'leased', id)
  schedule(id, '', expires, '0')
  table.insert(out, {id, token, f[1], f[2], f[3], f[4]})
end
return out
