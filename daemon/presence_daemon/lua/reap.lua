-- reap: list a batch of a dead owner's clients, so a survivor can disconnect them.
--
-- KEYS[1]  presence:owner:{id}:lease     string with a TTL, renewed while the owner lives
-- KEYS[2]  presence:owner:{id}:clients   set of "user|client id|token" the owner connected
-- ARGV[1]  most members to list
-- ARGV[2]  '1' to list them even though the lease is held (an owner clearing what an
--          earlier process of the same id left behind), else '0'
--
-- Returns {status, member...}
--   status 0  the owner is alive (lease held): nothing listed
--   status 1  the members that follow are listed (still in the set)
--   status 2  nothing left: the set is empty
--
-- Members stay in the set until the caller has disconnected them (the disconnect
-- removes the member), so a reaper that fails or is stopped half-way loses nothing: the
-- next pass lists them again. Every disconnect is guarded by the session token, so
-- several reapers may work on one owner at once, and a client that meanwhile
-- reconnected elsewhere is left alone.
if ARGV[2] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  return {0}
end
local batch = redis.call('SRANDMEMBER', KEYS[2], tonumber(ARGV[1]))
if #batch == 0 then
  return {2}
end
local out = {1}
for _, member in ipairs(batch) do
  out[#out + 1] = member
end
return out
