-- friends: change the friend list a user declares.
--
-- KEYS[1]  presence:{user}:clients   hash  client id -> "token|owner|address"
-- KEYS[2]  presence:{user}:version   string, the user's state version
-- KEYS[3]  presence:{user}:friends   set, whom the user declared
-- KEYS[4]  presence:{user}:fans      set, who declared the user
-- KEYS[5]  presence:{user}:pending   the outbox (see connect.lua; not used here)
-- KEYS[6]  presence:{user}:reindex   hash  name -> '1' (added) / '0' (removed): list
--                                    changes whose reverse index (fans.lua, under the
--                                    friend's tag) is not confirmed in step yet
-- ARGV[1]  the user's own name (never added to its own list)
-- ARGV[2]  'add', 'remove' or 'set' (replace the whole list)
-- ARGV[3]  most friends the list may hold afterwards
-- ARGV[4]  now, in milliseconds (versions never fall below it)
-- ARGV[5]  'client id|token' of the session asking, or '' (a caller without a session):
--          a session that is no longer the client id's current one changes nothing
--          (a request that waited in a stalled daemon must not undo later changes)
-- ARGV[6..] friend names
--
-- Returns {status, version, online, changes}
--   status   1 applied; 0 refused because the list would exceed ARGV[3] (nothing changed);
--            2 refused because the session in ARGV[5] is not current (nothing changed)
--   version  the user's state version after the call (bumped if anything changed)
--   online   1 if the user has a connected client
--   changes  flat array: name, 1 (added) or 0 (removed), 1 if name declares the user else 0;
--            this call's changes, then those of earlier calls still in KEYS[6]
--
-- The caller then updates each changed friend's reverse index (fans.lua, other hash
-- tags), sends notifications, and confirms with synced.lua; that part is not atomic
-- with this script, by design. Each change waits in KEYS[6] until confirmed, and every
-- call returns the waiting ones again: a change whose caller lost the answer or died
-- is completed by the next call (the client's retry, or its next connect with a list).
local user, op, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
if ARGV[5] ~= '' then
  local client_id, token = string.match(ARGV[5], '^([^|]*)|(.*)$')
  local entry = redis.call('HGET', KEYS[1], client_id)
  if not entry or string.sub(entry, 1, #token + 1) ~= token .. '|' then
    return {2, tonumber(redis.call('GET', KEYS[2]) or '0'), 0, {}}
  end
end
local wanted = {}
for i = 6, #ARGV do
  if ARGV[i] ~= user then wanted[ARGV[i]] = true end
end
local to_add, to_remove = {}, {}
if op == 'add' or op == 'set' then
  for name in pairs(wanted) do
    if redis.call('SISMEMBER', KEYS[3], name) == 0 then to_add[#to_add + 1] = name end
  end
end
if op == 'remove' then
  for name in pairs(wanted) do
    if redis.call('SISMEMBER', KEYS[3], name) == 1 then to_remove[#to_remove + 1] = name end
  end
elseif op == 'set' then
  for _, name in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    if not wanted[name] then to_remove[#to_remove + 1] = name end
  end
end
local online = redis.call('EXISTS', KEYS[1])
local count = redis.call('SCARD', KEYS[3]) + #to_add - #to_remove
if #to_add > 0 and count > limit then
  return {0, tonumber(redis.call('GET', KEYS[2]) or '0'), online, {}}
end
local changes = {}
local changed = {}
for _, name in ipairs(to_add) do
  redis.call('SADD', KEYS[3], name)
  redis.call('HSET', KEYS[6], name, '1')
  changed[name] = true
  changes[#changes + 1] = name
  changes[#changes + 1] = 1
  changes[#changes + 1] = redis.call('SISMEMBER', KEYS[4], name)
end
for _, name in ipairs(to_remove) do
  redis.call('SREM', KEYS[3], name)
  redis.call('HSET', KEYS[6], name, '0')
  changed[name] = true
  changes[#changes + 1] = name
  changes[#changes + 1] = 0
  changes[#changes + 1] = redis.call('SISMEMBER', KEYS[4], name)
end
local own = #changes
local waiting = redis.call('HGETALL', KEYS[6])
for i = 1, #waiting, 2 do
  local name = waiting[i]
  if not changed[name] then
    changes[#changes + 1] = name
    changes[#changes + 1] = tonumber(waiting[i + 1])
    changes[#changes + 1] = redis.call('SISMEMBER', KEYS[4], name)
  end
end
local version
if own > 0 then
  version = tonumber(redis.call('GET', KEYS[2]) or '0') + 1
  if tonumber(ARGV[4]) > version then version = tonumber(ARGV[4]) end
  redis.call('SET', KEYS[2], version)
else
  version = tonumber(redis.call('GET', KEYS[2]) or '0')
end
return {1, version, online, changes}
