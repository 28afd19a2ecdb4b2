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
return total
