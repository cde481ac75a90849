-- claim: bind a client id to a user and a session, unless another user holds it.
--
-- KEYS[1]  presence:client:{client id}   string "user|token|claimed_ms"
-- ARGV[1]  user
-- ARGV[2]  session token of the new session
-- ARGV[3]  now, in milliseconds (the caller's clock)
-- ARGV[4]  the exact current value, if the caller found it stale (the holder's clients
--          hash has no entry for this client id) and wants to take it over; else ''
-- ARGV[5]  how old, in milliseconds, a binding must be before it may be taken over
--
-- Returns '' when the client id is now bound to ARGV[1] with ARGV[2], otherwise the
-- current value, held by another user (nothing changed).
--
-- A binding is written before its user's entry; a young binding without an entry is
-- most likely a connect in flight, so only an old one can be taken over. The same
-- user may always re-bind (a reconnect).
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, #ARGV[1] + 1) ~= ARGV[1] .. '|' then
  if current ~= ARGV[4] then
    return current
  end
  local claimed = tonumber(string.match(current, '|(%d+)$') or '0')
  if tonumber(ARGV[3]) - claimed < tonumber(ARGV[5]) then
    return current
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[3])
return ''
