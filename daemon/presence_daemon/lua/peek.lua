-- peek: how one user looks to one viewer (read-only).
--
-- KEYS[1]  presence:{user}:clients   hash  client id -> "token|owner|address"
-- KEYS[2]  presence:{user}:version   string, the user's state version
-- KEYS[3]  presence:{user}:friends   set, whom the user declared
-- KEYS[4]  presence:{user}:fans      set, who declared the user
-- ARGV[1]  the viewer
--
-- Returns {visible, version}
--   visible  1 if the user is online and the user and the viewer declare each other
--   version  the user's state version
--
-- Everything is read from the user's own hash tag, so the pair (visible, version) is
-- consistent: every change that could alter visible also bumps version.
local visible = 0
if redis.call('EXISTS', KEYS[1]) == 1
  and redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1
  and redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then
  visible = 1
end
return {visible, tonumber(redis.call('GET', KEYS[2]) or '0')}
