-- lease: take or renew an owner's lease, and learn until when writes under it are safe.
--
-- KEYS[1]  presence:owner:{id}:lease    string token with a TTL: the owner is alive
-- KEYS[2]  presence:owner:{id}:marker   string with a long TTL: this Redis still
--                                       remembers the owner (gone if Redis lost its data)
-- ARGV[1]  the lease token of this process's current tenure (fresh for every take)
-- ARGV[2]  lease time to live, in milliseconds
-- ARGV[3]  'take' or 'renew'
-- ARGV[4]  marker time to live, in milliseconds
--
-- Returns {status, value}
--   status 1  held: value is the fence, the moment (ms, this server's clock) the lease
--             runs out unless renewed again
--   status 0  'take' only: another token holds the lease; value is its PTTL
--   status 2  'renew' only: the lease lapsed or another tenure took it (nothing changed)
--   status 3  'renew' only: lapsed and the marker is gone too: Redis lost this owner's
--             state (restarted empty, or failed over to a replica that missed it)
--
-- A renewal never re-creates a lapsed lease: one delayed in a socket cannot make a
-- lapse look like a continuous tenure. The clock read is this server's, which is the
-- clock every fenced script compares against.
local current = redis.call('GET', KEYS[1])
if ARGV[3] == 'take' then
  if current and current ~= ARGV[1] then
    return {0, redis.call('PTTL', KEYS[1])}
  end
elseif current ~= ARGV[1] then
  if redis.call('EXISTS', KEYS[2]) == 0 then
    return {3, 0}
  end
  return {2, 0}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
local t = redis.call('TIME')
return {1, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])}
