-- ARGV: prefix, id.
return drop(ARGV[2])
