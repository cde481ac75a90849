-- reap: take a batch of a dead owner's clients, so a survivor can disconnect them.
--
-- KEYS[1]  presence:owner:{id}:lease     string with a TTL, refreshed while the owner lives
-- KEYS[2]  presence:owner:{id}:clients   set of "user|client id|token" the owner connected
-- ARGV[1]  most members to take
-- ARGV[2]  '1' to take them even though the lease is held (an owner clearing what an
--          earlier process of the same id left behind), else '0'
--
-- Returns {status, member...}
--   status 0  the owner is alive (lease held): nothing taken
--   status 1  the members that follow were taken (removed from the set)
--   status 2  nothing left: the set is gone
--
-- SPOP hands each member to exactly one caller, so several survivors may reap the same
-- owner at once; the disconnect of each member is guarded by its session token, so a
-- client that meanwhile reconnected elsewhere is left alone.
if ARGV[2] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  return {0}
end
local batch = redis.call('SPOP', KEYS[2], tonumber(ARGV[1]))
if #batch == 0 then
  return {2}
end
local out = {1}
for _, member in ipairs(batch) do
  out[#out + 1] = member
end
return out
