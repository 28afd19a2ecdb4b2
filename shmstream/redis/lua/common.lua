-- Helpers shared by the scripts that start with "-- include: common.lua" (prepended by
-- shmstream/redis/scripts.py). ARGV[1] is always the namespace's key prefix.
-- Numbers cross into Redis as strings made by Python or by string.format('%d'): Lua's own
-- number-to-string conversion uses "%.14g" and would round microsecond timestamps.
local prefix = ARGV[1]
local all = prefix .. 'all'

-- End a running session: state, completion time, expiry, wake-up. 1 if this call ended it.
local function finish(gen, state, now_us, ttl_ms, deadline)
  local meta = prefix .. 's:' .. gen
  local fields = redis.call('HMGET', meta, 'state', 'member', 'pset', 'cap')
  if fields[1] ~= '0' then return 0 end
  -- First a write that cannot grow memory: at maxmemory Redis refuses a script's growing
  -- commands only until it has written something, so ending a session still works when
  -- Redis is full (appends and new sessions are refused: they start with a growing write).
  redis.call('DEL', prefix .. 'l:' .. gen)
  redis.call('HSET', meta, 'state', state, 'completed', now_us)
  -- SETRANGE grew the ring greedily (up to twice its length). One that never wrapped stops
  -- growing now: copy it into a string of its exact size (a wrapped one is at capacity).
  local ring = prefix .. 'd:' .. gen
  local held = redis.call('STRLEN', ring)
  if held > 0 and held < tonumber(fields[4]) then
    redis.call('SET', ring, redis.call('GET', ring))
  end
  if fields[3] then redis.call('SREM', fields[3], gen) end
  redis.call('ZADD', all, 'XX', deadline, fields[2])
  redis.call('PEXPIRE', meta, ttl_ms)
  redis.call('PEXPIRE', ring, ttl_ms)
  local message = 'e' .. state
  redis.call('PUBLISH', prefix .. 'n:' .. gen, message)
  redis.call('PUBLISH', prefix .. 'k:' .. gen, message)
  return 1
end

-- Flag a session cancelled (its producer stops). 0 if it is gone.
local function flag_cancel(gen)
  local meta = prefix .. 's:' .. gen
  if redis.call('EXISTS', meta) == 0 then return 0 end
  redis.call('HSET', meta, 'cancel', '1')
  redis.call('PUBLISH', prefix .. 'k:' .. gen, 'c')
  return 1
end

-- Finish (cancelling first if asked) and detach from the index; open handles keep the keys
-- for at most grace_ms. The caller removes the index field. 1 if the session was there.
local function retire(gen, state, cancel, now_us, ttl_ms, deadline, grace_ms)
  local meta = prefix .. 's:' .. gen
  local member = redis.call('HGET', meta, 'member')
  if not member then return 0 end
  redis.call('ZREM', all, member)  -- first: a write that cannot grow memory (see finish)
  if cancel == '1' then flag_cancel(gen) end
  finish(gen, state, now_us, ttl_ms, deadline)
  for _, key in ipairs({meta, prefix .. 'd:' .. gen}) do
    local left = redis.call('PTTL', key)
    if left == -1 or left > tonumber(grace_ms) then redis.call('PEXPIRE', key, grace_ms) end
  end
  return 1
end
