-- ARGV: prefix, route, '1' to set | '0' to clear, the state's JSON.
if ARGV[3] == '1' then
  redis.call('HSET', P .. 'route_states', ARGV[2], ARGV[4])
else
  redis.call('HDEL', P .. 'route_states', ARGV[2])
end
return 1
