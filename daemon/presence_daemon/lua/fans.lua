-- fans: record that another user started or stopped declaring this user as a friend.
--
-- KEYS[1]  presence:{user}:clients   hash  client id -> "token|owner|address"
-- KEYS[2]  presence:{user}:version   string, the user's state version
-- KEYS[3]  presence:{user}:friends   set, whom the user declared
-- KEYS[4]  presence:{user}:fans      set, who declared the user
-- KEYS[5]  presence:{user}:pending   the outbox (see connect.lua; not used here)
-- ARGV[1]  'add' or 'remove'
-- ARGV[2]  the fan: the user who declared (or stopped declaring) this user
-- ARGV[3]  now, in milliseconds (versions never fall below it)
--
-- Returns {version, online, visible}
--   version  the user's state version after the call (bumped if the index changed)
--   online   1 if the user has a connected client
--   visible  1 if the fan now sees the user online: online, and the two are mutual
local changed
if ARGV[1] == 'add' then
  changed = redis.call('SADD', KEYS[4], ARGV[2])
else
  changed = redis.call('SREM', KEYS[4], ARGV[2])
end
local version
if changed == 1 then
  version = tonumber(redis.call('GET', KEYS[2]) or '0') + 1
  if tonumber(ARGV[3]) > version then version = tonumber(ARGV[3]) end
  redis.call('SET', KEYS[2], version)
else
  version = tonumber(redis.call('GET', KEYS[2]) or '0')
end
local online = redis.call('EXISTS', KEYS[1])
local visible = 0
if online == 1 and ARGV[1] == 'add' and redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 1 then
  visible = 1
end
return {version, online, visible}
