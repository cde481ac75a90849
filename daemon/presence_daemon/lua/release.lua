-- release: unbind a client id, but only from the session that is ending.
--
-- KEYS[1]  presence:client:{client id}   string "user|token|claimed_ms"
-- ARGV[1]  "user|token" of the session that ended
--
-- Returns 1 if the binding was removed, 0 if it belongs to another (newer) session.
local current = redis.call('GET', KEYS[1])
if current and string.match(current, '^(.*)|%d+$') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
