-- include: common.lua
-- KEYS: index. ARGV: prefix, id hash, state, cancel, now_us, ttl_ms, deadline, grace_ms.
local gen = redis.call('HGET', KEYS[1], ARGV[2])
if not gen then return 0 end
redis.call('HDEL', KEYS[1], ARGV[2])
return retire(gen, ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
