-- include: common.lua
-- KEYS: index, new meta, new lease. ARGV: prefix, id hash, gen, member, id, record, capacity,
-- now_us, ttl_ms, deadline, grace_ms, lease_ms, max_sessions (0: none), now_ms, host, pid,
-- producer identity (leases.producer_identity), the producer scope's set.
local index, meta, lease = KEYS[1], KEYS[2], KEYS[3]
local id_hash, gen = ARGV[2], ARGV[3]
local replaced = 0
-- The first write grows memory, so at maxmemory Redis refuses the whole script here, before
-- anything changed: a full Redis makes no new session, replacing one or not.
redis.call('SET', lease, '1', 'PX', ARGV[12])
local old = redis.call('HGET', index, id_hash)
if old then
  replaced = retire(old, '2', '1', ARGV[8], ARGV[9], ARGV[10], ARGV[11])
  redis.call('HDEL', index, id_hash)
end
local limit = tonumber(ARGV[13])
if limit > 0 and redis.call('ZCOUNT', all, '(' .. ARGV[14], '+inf') >= limit then
  redis.call('DEL', lease)
  return -1
end
redis.call('HSET', meta, 'id', ARGV[5], 'rec', ARGV[6], 'state', '0', 'cancel', '0',
           'total', '0', 'cap', ARGV[7], 'started', ARGV[8], 'completed', '0',
           'host', ARGV[15], 'pid', ARGV[16], 'producer', ARGV[17], 'pset', ARGV[18],
           'member', ARGV[4])
redis.call('SADD', ARGV[18], gen)
redis.call('HSET', index, id_hash, gen)
redis.call('ZADD', all, '+inf', ARGV[4])
return replaced
