-- connect: register one client of a user; decide the user's offline -> online transition.
--
-- KEYS[1]  presence:{user}:clients   hash  client id -> "token|owner|address"
-- KEYS[2]  presence:{user}:version   string, the user's state version
-- KEYS[3]  presence:{user}:friends   set, whom the user declared
-- KEYS[4]  presence:{user}:fans      set, who declared the user
-- KEYS[5]  presence:{user}:pending   string "online|version|decided_ms": a decided
--                                    transition whose telling is not confirmed (the outbox)
-- KEYS[6]  presence:{user}:n:<client id>  string, the client id's last connect number
--          (needed only with a connect number)
-- KEYS[7]  (restore only, optional) presence:{user}:kicked:<client id>  string, the token
--          of a session an operator kicked: that session is never put back
-- ARGV[1]  client id
-- ARGV[2]  entry, "token|owner|address" (token first: disconnect guards on it)
-- ARGV[3]  now, in milliseconds (versions never fall below it, so they survive a Redis
--          that restarted empty)
-- ARGV[4]  fence: the moment, in milliseconds on this server's clock, at which the
--          caller's lease runs out, or '0' for a caller without a lease
-- ARGV[5]  'connect' (replace the entry the client id has, given proof), 'restore' (put
--          the entry back only if the client id has no entry or one with the same
--          token) or 'check' (make the checks below and write nothing)
-- ARGV[6]  grace, in milliseconds: an unconfirmed transition younger than this is left
--          to the call that decided it (it is most likely telling it right now)
-- ARGV[7]  (optional, default '0') the CONNECT's number, or '0' for none: a number below the client id's last
--          one, or equal to it while the client id has no entry (that session ended), is
--          a replay; the number is kept a day past the last connect or disconnect
-- ARGV[8]  (optional, default '*') proof that a 'connect' may replace the client id's entry: '*' (the caller
--          vouches: a verified login token for the user, or a library call), or the
--          token of the session it replaces ('' for none)
-- ARGV[9]  (optional) '1': also answer the names the user declared (for the new
--          session's first view of its friends), as a 6th element
--
-- Returns {status, went_online, version, previous, pending[, friends]}
--   status       1 applied (or, for 'check', would be); 0 fenced: the lease ran out
--                before this ran; 2 superseded: 'restore' found another session; 3 stale:
--                a replayed connect number; 4 in use: the client id has an entry of
--                another session and there is no proof (nothing changed but for 1)
--   went_online  1 if this call made the user go from no clients to one, else 0
--   version      the user's state version after the call
--   previous     the entry this call replaced (same client id, older session), or ''
--   pending      {} or {online, version, decided_ms, mutual friend...[, older]}: the transition to
--                tell, this call's own, or one an earlier call decided at least ARGV[6] ms
--                ago and did not confirm told (KEYS[5] holds "online|version|decided_ms",
--                followed by ";online|version|decided_ms" for each older unconfirmed
--                transition it replaced: those are answered as one last element
--                "online|version|decided_ms;..." that, unlike a name, holds '|')
--
-- The fence is the one place a script reads the clock: it must be the clock of the server
-- that applies the write, at the moment it applies it (a write delayed in a socket or a
-- stalled process must not land after the lease ran out and a survivor reaped).
-- A repeated connect of a connected client id replaces its entry (new session, new
-- owner) and is never a transition. All keys share the user's hash tag.
if ARGV[4] ~= '0' then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) >= tonumber(ARGV[4]) then
    return {0, 0, 0, '', {}}
  end
end
local previous = redis.call('HGET', KEYS[1], ARGV[1]) or ''
local token = string.match(ARGV[2], '^[^|]*')
local old = string.match(previous, '^[^|]*')
local number = tonumber(ARGV[7] or '0')
local proof = ARGV[8] or '*'
if number > 0 then
  local last = tonumber(redis.call('GET', KEYS[6]) or '0')
  if number < last or (number == last and previous == '') then
    return {3, 0, tonumber(redis.call('GET', KEYS[2]) or '0'), previous, {}}
  end
  -- The same number while the entry lives: this connect again (its answer was lost).
  if number == last then proof = '*' end
end
if ARGV[5] == 'restore' and KEYS[7] and redis.call('GET', KEYS[7]) == token then
  return {2, 0, tonumber(redis.call('GET', KEYS[2]) or '0'), previous, {}}
end
if ARGV[5] == 'restore' and previous ~= '' and old ~= token then
  return {2, 0, tonumber(redis.call('GET', KEYS[2]) or '0'), previous, {}}
end
if ARGV[5] ~= 'restore' and previous ~= '' and old ~= token and proof ~= '*'
    and proof ~= old then
  return {4, 0, tonumber(redis.call('GET', KEYS[2]) or '0'), previous, {}}
end
if ARGV[5] == 'check' then
  return {1, 0, tonumber(redis.call('GET', KEYS[2]) or '0'), previous, {}}
end
if number > 0 then
  redis.call('SET', KEYS[6], ARGV[7], 'PX', 86400000)
end
-- An unconfirmed transition this decision replaces is kept after it ("new;old...", at
-- most ~400 bytes) until the whole value is confirmed: its teller may have died before
-- appending it to the transition stream, and whoever tells the new one appends it.
local function outbox(head, old)
  if not old then return head end
  local value = head .. ';' .. old
  if #value > 400 then value = string.match(string.sub(value, 1, 400), '^(.*);') end
  return value
end
local before = redis.call('HLEN', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local went_online = 0
local decided = 0
local version
if before > 0 then
  version = tonumber(redis.call('GET', KEYS[2]) or '0')
else
  went_online, decided = 1, 1
  version = tonumber(redis.call('GET', KEYS[2]) or '0') + 1
  if tonumber(ARGV[3]) > version then version = tonumber(ARGV[3]) end
  redis.call('SET', KEYS[2], version)
  redis.call('SET', KEYS[5], outbox('1|' .. version .. '|' .. ARGV[3], redis.call('GET', KEYS[5])))
end
local pending = {}
local told = redis.call('GET', KEYS[5])
if told then
  local online, at = string.match(told, '^(%d)|(%d+)')
  local since = string.match(told, '^%d|%d+|(%d+)') or '0'  -- (no time: long abandoned)
  if decided == 1 or tonumber(ARGV[3]) - tonumber(since) >= tonumber(ARGV[6]) then
    pending = {tonumber(online), tonumber(at), tonumber(since)}
    for _, name in ipairs(redis.call('SINTER', KEYS[3], KEYS[4])) do
      pending[#pending + 1] = name
    end
    local older = string.match(told, '^[^;]*;(.+)$')
    if older then pending[#pending + 1] = older end
  end
end
if ARGV[9] == '1' then
  return {1, went_online, version, previous, pending, redis.call('SMEMBERS', KEYS[3])}
end
return {1, went_online, version, previous, pending}
