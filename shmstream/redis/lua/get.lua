-- KEYS: index. ARGV: prefix, id hash. Returns {gen, id, cap, total} or nil; drops a stale
-- index field.
local gen = redis.call('HGET', KEYS[1], ARGV[2])
if not gen then return nil end
local fields = redis.call('HMGET', ARGV[1] .. 's:' .. gen, 'id', 'cap', 'total')
if not fields[1] then
  redis.call('HDEL', KEYS[1], ARGV[2])
  return nil
end
return {gen, fields[1], fields[2], fields[3]}
