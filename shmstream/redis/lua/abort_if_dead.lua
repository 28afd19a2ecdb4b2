-- include: common.lua
-- ARGV: prefix, gen, now_us, ttl_ms, deadline. Aborts a running session whose lease expired.
local gen = ARGV[2]
if redis.call('EXISTS', prefix .. 'l:' .. gen) == 1 then return 0 end
return finish(gen, '4', ARGV[3], ARGV[4], ARGV[5])
