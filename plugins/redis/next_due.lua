-- ARGV: prefix, node.  Returns {score, 1 if reserved for another node} or nil.
local node, best, other = ARGV[2], nil, 0
local function first(owner, add, flag)
  local r = redis.call('ZRANGE', dkey(owner), 0, 0, 'WITHSCORES')
  if r[1] then
    local t = tonumber(r[2]) + add
    if best == nil or t < best[1] then best = {t, r[2], flag} end
  end
end
first('', 0, 0)
for _, owner in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
  if owner == node then first(owner, 0, 0) else first(owner, tonumber(ARGV[3]), 1) end
end
if best == nil then return false end
return {best[2], best[3]}
