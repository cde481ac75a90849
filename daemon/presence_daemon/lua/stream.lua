-- stream: read a page of the transition stream after an id, and say whether any entry
-- after it was lost.
--
-- KEYS[1]  presence:transitions   stream of transitions (see keys.py)
-- ARGV[1]  the id of the last entry the reader has, or '0-0' (from the oldest entry kept:
--          nothing to check)
-- ARGV[2]  most entries to answer
--
-- Returns {kept, entries}
--   kept     1 if ARGV[1] is '0-0' or still in the stream, else 0: it was trimmed (the
--            cap trims only the oldest entries, so while it is there, so is every entry
--            after it) or the stream was lost (Redis restarted empty)
--   entries  up to ARGV[2] entries after ARGV[1], oldest first, as XRANGE answers them
--            ({} when kept is 0)
--
-- One script, so the check and the read see the same stream: a trim cannot fall
-- between them.
local after = ARGV[1]
if after ~= '0-0' and #redis.call('XRANGE', KEYS[1], after, after) == 0 then
  return {0, {}}
end
return {1, redis.call('XRANGE', KEYS[1], '(' .. after, '+', 'COUNT', tonumber(ARGV[2]))}
