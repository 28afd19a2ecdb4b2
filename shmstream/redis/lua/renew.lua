-- ARGV: prefix, lease_ms, gens... Renews the lease of each running one.
-- Returns per gen: 0 running, 1 cancelled (still running), 2 finished or gone.
local prefix, lease_ms = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV do
  local gen = ARGV[i]
  local fields = redis.call('HMGET', prefix .. 's:' .. gen, 'state', 'cancel')
  if fields[1] == '0' then
    -- PEXPIRE cannot grow memory: renewals go on when Redis is full
    local lease = prefix .. 'l:' .. gen
    if redis.call('PEXPIRE', lease, lease_ms) == 0 then
      redis.call('SET', lease, '1', 'PX', lease_ms)
    end
    out[#out + 1] = (fields[2] == '1') and 1 or 0
  else
    out[#out + 1] = 2
  end
end
return out
