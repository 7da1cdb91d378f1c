-- ARGV: prefix, then message ids.  Returns their bodies (nil for one not there).
local out = {}
for i = 2, #ARGV do
  out[i - 1] = redis.call('HGET', P .. 'm:' .. ARGV[i], 'body') or false
end
return out
