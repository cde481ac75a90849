-- told: confirm that a decided transition reached every mutual friend's owner.
--
-- KEYS[1]  presence:{user}:pending   string "online|version|decided_ms[;older...]" (see
--          connect.lua)
-- ARGV[1]  the whole value that was told (and appended to the transition stream)
--
-- Returns 1 if the outbox held exactly that value and is now empty, else 0 (a newer
-- transition was decided meanwhile: it stays until its own teller confirms it).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
