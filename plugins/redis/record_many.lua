-- ARGV: prefix, n, then per record the 8 arguments of record.lua after its
-- prefix.  Returns the list of what record.lua returns for each, in order.
-- Not a script on its own: scripts.py puts record.lua before it, as the
-- function record(ARGV).
local out, n = {}, tonumber(ARGV[2])
for i = 0, n - 1 do
  local args = {ARGV[1]}
  for j = 1, 8 do args[j + 1] = ARGV[2 + i * 8 + j] end
  out[i + 1] = record(args)
end
return out
