-- include: common.lua
-- ARGV: prefix, now_us, ttl_ms, deadline. Aborts running sessions without a lease and drops
-- running entries whose keys vanished. Returns {aborted, removed}.
local aborted, removed = 0, 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', all, '+inf', '+inf')) do
  local gen = string.match(member, '^(%x+):')
  if not gen or redis.call('EXISTS', prefix .. 's:' .. gen) == 0 then
    redis.call('ZREM', all, member)
    removed = removed + 1
  elseif redis.call('EXISTS', prefix .. 'l:' .. gen) == 0 then
    aborted = aborted + finish(gen, '4', ARGV[2], ARGV[3], ARGV[4])
  end
end
return {aborted, removed}
