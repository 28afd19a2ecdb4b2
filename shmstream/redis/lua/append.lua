-- KEYS: meta, data. ARGV: bytes, notify channel, largest chunk to publish. Returns the new
-- total, or -1 if finished. Mirrors ring.write: a chunk of capacity bytes or more keeps its
-- last capacity bytes. The notification carries the chunk when it is small and whole.
local meta, ring = KEYS[1], KEYS[2]
local fields = redis.call('HMGET', meta, 'state', 'total', 'cap')
if fields[1] ~= '0' then return -1 end
local data = ARGV[1]
local length = #data
local capacity = tonumber(fields[3])
local total = redis.call('HINCRBY', meta, 'total', length)
local start = total - length
local before = start  -- the ring's length before this append was min(before, capacity)
if length < capacity and length <= tonumber(ARGV[3]) then
  redis.call('PUBLISH', ARGV[2], string.format('t%d:', total) .. data)
else
  redis.call('PUBLISH', ARGV[2], string.format('t%d', total))
end
if length >= capacity then
  data = string.sub(data, length - capacity + 1)
  start = total - capacity
  length = capacity
end
local position = start % capacity
local first = capacity - position
if length <= first then
  redis.call('SETRANGE', ring, position, data)
else
  redis.call('SETRANGE', ring, position, string.sub(data, 1, first))
  redis.call('SETRANGE', ring, 0, string.sub(data, first + 1))
end
-- The ring just became full and stops growing. SETRANGE grew it greedily (up to twice its
-- length below 1 MiB, +1 MiB above): copy it once into a string of its exact size, unless
-- the slack is within what the allocator's rounding would leave anyway (a quarter).
if before < capacity and total >= capacity then
  -- pcall: a Redis that disables MEMORY (some managed ones) keeps the slack, nothing fails.
  local usage = redis.pcall('MEMORY', 'USAGE', ring)
  if type(usage) == 'number' and usage > capacity + capacity / 4 + 4096 then
    redis.call('SET', ring, redis.call('GET', ring))  -- a running ring has no TTL to keep
  end
end
return total
