-- ARGV: prefix, now_ms, batch. Removes up to batch sessions past their deadline, with their
-- index fields. Returns how many.
local prefix = ARGV[1]
local all = prefix .. 'all'
local members = redis.call('ZRANGEBYSCORE', all, '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, member in ipairs(members) do
  local gen, base, id_hash = string.match(member, '^(%x+):(%x+):(%x+)$')
  if gen then
    redis.call('DEL', prefix .. 's:' .. gen, prefix .. 'd:' .. gen, prefix .. 'l:' .. gen)
    local index = prefix .. 'i:' .. base
    if redis.call('HGET', index, id_hash) == gen then redis.call('HDEL', index, id_hash) end
  end
  redis.call('ZREM', all, member)
end
return #members
