-- synced: confirm that list changes reached the friends' reverse indexes (and were told).
--
-- KEYS[1]  presence:{user}:reindex   hash name -> '1' / '0' (see friends.lua)
-- ARGV     pairs: name, the value that was propagated
--
-- Returns how many entries were removed. An entry whose value changed meanwhile (the
-- name was added again, or removed again) stays for its own caller to confirm.
local removed = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
return removed
