-- include: common.lua
-- ARGV: prefix, gen, state, cancel ('1'/'0'), now_us, ttl_ms, deadline.
-- Returns {ended by this call, session exists}.
local gen = ARGV[2]
local exists = redis.call('EXISTS', prefix .. 's:' .. gen)
-- finish first: it starts with a write that cannot grow memory (a cancel works at maxmemory)
local ended = finish(gen, ARGV[3], ARGV[5], ARGV[6], ARGV[7])
if ARGV[4] == '1' then flag_cancel(gen) end
return {ended, exists}
