-- disconnect: remove one client of a user; decide the user's online -> offline transition.
--
-- KEYS[1]  presence:{user}:clients   hash  client id -> "token|owner|address"
-- KEYS[2]  presence:{user}:version   string, the user's state version
-- KEYS[3]  presence:{user}:friends   set, whom the user declared
-- KEYS[4]  presence:{user}:fans      set, who declared the user
-- KEYS[5]  presence:{user}:pending   the outbox, "online|version|decided_ms" (see connect.lua)
-- KEYS[6]  (optional) presence:{user}:n:<client id>  the client id's last connect number (see
--          connect.lua): kept a day past this disconnect, so a replay stays refused
-- ARGV[1]  client id
-- ARGV[2]  session token the caller believes is current, or '' to remove whatever is there
-- ARGV[3]  now, in milliseconds (versions never fall below it)
-- ARGV[4]  grace, in milliseconds (see connect.lua)
--
-- Returns {removed, went_offline, version, entry, pending}
--   removed       1 if an entry was removed, 0 if the client was not connected or its
--                 entry carries another token (a newer session: leave it alone)
--   went_offline  1 if this call removed the user's last client, else 0
--   version       the user's state version after the call
--   entry         the removed entry "token|owner|address", or '' if nothing was removed
--                 (without a token the caller learns here which session it ended)
--   pending       {} or {online, version, decided_ms, mutual friend...[, older]}: as connect.lua
--                 (so a retried disconnect whose first try's answer was lost still tells)
-- An unconfirmed transition this decision replaces is kept after it (see connect.lua).
local function outbox(head, old)
  if not old then return head end
  local value = head .. ';' .. old
  if #value > 400 then value = string.match(string.sub(value, 1, 400), '^(.*);') end
  return value
end
local entry = redis.call('HGET', KEYS[1], ARGV[1])
local guard = ARGV[2]
local removed, went_offline, decided = 0, 0, 0
if entry and (guard == '' or string.sub(entry, 1, #guard + 1) == guard .. '|') then
  removed = 1
  redis.call('HDEL', KEYS[1], ARGV[1])
  if KEYS[6] then redis.call('PEXPIRE', KEYS[6], 86400000) end
  if redis.call('HLEN', KEYS[1]) == 0 then
    went_offline, decided = 1, 1
    local version = tonumber(redis.call('GET', KEYS[2]) or '0') + 1
    if tonumber(ARGV[3]) > version then version = tonumber(ARGV[3]) end
    redis.call('SET', KEYS[2], version)
    redis.call('SET', KEYS[5], outbox('0|' .. version .. '|' .. ARGV[3], redis.call('GET', KEYS[5])))
  end
else
  entry = ''
end
local pending = {}
local told = redis.call('GET', KEYS[5])
if told then
  local online, at = string.match(told, '^(%d)|(%d+)')
  local since = string.match(told, '^%d|%d+|(%d+)') or '0'  -- (no time: long abandoned)
  if decided == 1 or tonumber(ARGV[3]) - tonumber(since) >= tonumber(ARGV[4]) then
    pending = {tonumber(online), tonumber(at), tonumber(since)}
    for _, name in ipairs(redis.call('SINTER', KEYS[3], KEYS[4])) do
      pending[#pending + 1] = name
    end
    local older = string.match(told, '^[^;]*;(.+)$')
    if older then pending[#pending + 1] = older end
  end
end
return {removed, went_offline, tonumber(redis.call('GET', KEYS[2]) or '0'), entry, pending}
