-- claim: bind a client id to a user and a session, unless another user holds it.
--
-- KEYS[1]  presence:client:{client id}   string "user|token"
-- ARGV[1]  user
-- ARGV[2]  session token of the new session
-- ARGV[3]  a stale value the caller has checked is dead and may be overwritten, or ''
--
-- Returns '' when the client id is now bound to ARGV[1] with ARGV[2], otherwise the
-- current value "user|token" of the other user that holds it (nothing changed).
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[3]
  and string.sub(current, 1, #ARGV[1] + 1) ~= ARGV[1] .. '|' then
  return current
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2])
return ''
