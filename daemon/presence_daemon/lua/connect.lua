-- connect: register one client of a user; decide the user's offline -> online transition.
--
-- KEYS[1]  presence:{user}:clients   hash  client id -> "token|owner|address"
-- KEYS[2]  presence:{user}:version   string, the user's state version
-- KEYS[3]  presence:{user}:friends   set, whom the user declared
-- KEYS[4]  presence:{user}:fans      set, who declared the user
-- ARGV[1]  client id
-- ARGV[2]  entry, "token|owner|address" (token first: disconnect guards on it)
--
-- Returns {went_online, version, mutual, previous}
--   went_online  1 if this call made the user go from no clients to one, else 0
--   version      the user's state version after the call
--   mutual       the user's mutual friends (declared both ways) if went_online, else {}
--   previous     the entry this call replaced (same client id, older session), or ''
--
-- A repeated connect of a connected client id replaces its entry (new session, new
-- owner) and is never a transition. All keys share the user's hash tag.
local before = redis.call('HLEN', KEYS[1])
local previous = redis.call('HGET', KEYS[1], ARGV[1]) or ''
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if before > 0 then
  return {0, tonumber(redis.call('GET', KEYS[2]) or '0'), {}, previous}
end
local version = redis.call('INCR', KEYS[2])
return {1, version, redis.call('SINTER', KEYS[3], KEYS[4]), previous}
