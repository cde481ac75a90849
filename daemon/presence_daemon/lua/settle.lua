-- settle: read a user's unconfirmed transition, to tell it (nothing is changed).
--
-- KEYS[1..5]  the user's keys, as connect.lua
-- ARGV[1]     now, in milliseconds
-- ARGV[2]     grace, in milliseconds: a younger transition is left to its decider
--
-- Returns {} or {online, version, decided_ms, mutual friend...[, older]}, as connect.lua.
--
-- Called by a caller whose connect or disconnect failed without an answer (the script
-- may have run and decided a transition that nobody will tell otherwise).
local told = redis.call('GET', KEYS[5])
if not told then
  return {}
end
local online, at = string.match(told, '^(%d)|(%d+)')
local since = string.match(told, '^%d|%d+|(%d+)') or '0'  -- (no time: long abandoned)
if tonumber(ARGV[1]) - tonumber(since) < tonumber(ARGV[2]) then
  return {}
end
local pending = {tonumber(online), tonumber(at), tonumber(since)}
for _, name in ipairs(redis.call('SINTER', KEYS[3], KEYS[4])) do
  pending[#pending + 1] = name
end
local older = string.match(told, '^[^;]*;(.+)$')
if older then pending[#pending + 1] = older end
return pending
