-- ARGV: prefix, route, node, want, holding, limit, now, expires (now + ttl).
-- Returns the share given.  What mailhub.model.fair_share computes in Python,
-- computed here so that reading the others' shares and writing this one are
-- one step: expired shares dropped, then min(want, fair, free), free counting
-- for each other node the larger of its share and what it holds.  A value is
-- "given want expires holding" (an earlier version wrote no holding: 0).
-- Names are ordered by their bytes, as Python orders str (Lua's < on strings
-- would follow the server's locale).  A share of 0 wanting 0 counts for
-- nothing, so it is dropped rather than kept: an idle route holds no key.
local key, node = P .. 'shares:' .. ARGV[2], ARGV[3]
local want, holding, limit = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now, expires = tonumber(ARGV[7]), ARGV[8]
local function before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local others, wants = 0, {{node, want}}
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local name = all[i]
  if name ~= node then
    local given, wanted, until_, held = string.match(all[i + 1], '^(%S+) (%S+) (%S+) ?(%S*)$')
    if tonumber(until_) <= now then
      redis.call('HDEL', key, name)
    else
      others = others + math.max(tonumber(given), tonumber(held) or 0)
      table.insert(wants, {name, tonumber(wanted)})
    end
  end
end
-- Max-min fairness: fill the smallest wants first (by want, then name);
-- once every node left wants more than an equal part of what is left, each
-- gets that part, the remainder one each to the first of them by name.
local left, pending, fair = math.max(0, limit), {}, {}
for _, w in ipairs(wants) do
  if w[2] > 0 then table.insert(pending, w) end
end
table.sort(pending, function(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  return before(a[1], b[1])
end)
local i = 1
while i <= #pending do
  local count = #pending - i + 1
  local equal = math.floor(left / count)
  if pending[i][2] <= equal then
    fair[pending[i][1]] = pending[i][2]
    left = left - pending[i][2]
    i = i + 1
  else
    local extra, names = left - equal * count, {}
    for j = i, #pending do table.insert(names, pending[j][1]) end
    table.sort(names, before)
    for j, name in ipairs(names) do
      if j <= extra then fair[name] = equal + 1 else fair[name] = equal end
    end
    break
  end
end
local mine = math.min(fair[node] or 0, math.max(0, want))
local given = math.max(0, math.min(want, mine, limit - others))
if given == 0 and want == 0 and holding == 0 then
  redis.call('HDEL', key, node)
else
  redis.call('HSET', key, node, string.format('%d %d %s %d', given, want, expires, holding))
end
return given
