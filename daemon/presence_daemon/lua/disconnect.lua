-- disconnect: remove one client of a user; decide the user's online -> offline transition.
--
-- KEYS[1]  presence:{user}:clients   hash  client id -> "token|owner|address"
-- KEYS[2]  presence:{user}:version   string, the user's state version
-- KEYS[3]  presence:{user}:friends   set, whom the user declared
-- KEYS[4]  presence:{user}:fans      set, who declared the user
-- ARGV[1]  client id
-- ARGV[2]  session token the caller believes is current, or '' to remove whatever is there
--
-- Returns {removed, went_offline, version, mutual, entry}
--   removed       1 if an entry was removed, 0 if the client was not connected or its
--                 entry carries another token (a newer session: leave it alone)
--   went_offline  1 if this call removed the user's last client, else 0
--   version       the user's state version after the call
--   mutual        the user's mutual friends if went_offline, else {}
--   entry         the removed entry "token|owner|address", or '' if nothing was removed
--                 (without a token the caller learns here which session it ended)
local entry = redis.call('HGET', KEYS[1], ARGV[1])
local guard = ARGV[2]
if (not entry) or (guard ~= '' and string.sub(entry, 1, #guard + 1) ~= guard .. '|') then
  return {0, 0, tonumber(redis.call('GET', KEYS[2]) or '0'), {}, ''}
end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HLEN', KEYS[1]) > 0 then
  return {1, 0, tonumber(redis.call('GET', KEYS[2]) or '0'), {}, entry}
end
local version = redis.call('INCR', KEYS[2])
return {1, 1, version, redis.call('SINTER', KEYS[3], KEYS[4]), entry}
