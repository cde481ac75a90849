-- peek: how one user looks to one viewer (reads; writes only a missing first version).
--
-- KEYS[1]  presence:{user}:clients   hash  client id -> "token|owner|address"
-- KEYS[2]  presence:{user}:version   string, the user's state version
-- KEYS[3]  presence:{user}:friends   set, whom the user declared
-- KEYS[4]  presence:{user}:fans      set, who declared the user
-- KEYS[5]  presence:{user}:pending   the outbox (see connect.lua; not used here)
-- ARGV[1]  the viewer
-- ARGV[2]  now, in milliseconds: the version of a user with none yet (it is stored, so
--          every later change is numbered above it, whatever the writer's clock says)
-- ARGV[3]  (optional) '1': also answer the user's clients, so a caller that is about to
--          tell the user something needs no second read
--
-- Returns {visible, version} or, with ARGV[3] = '1', {visible, version, clients}
--   visible  1 if the user is online and the user and the viewer declare each other
--   version  the user's state version
--   clients  the user's clients hash as a flat list: client id, "token|owner|address", ...
--
-- Everything is read from the user's own hash tag, so the pair (visible, version) is
-- consistent: every change that could alter visible also bumps version. The one write
-- (a first version) keeps a snapshot after Redis restarted empty from handing out a
-- version lower than those clients already hold.
local visible = 0
local clients
local online
if ARGV[3] == '1' then
  clients = redis.call('HGETALL', KEYS[1])
  online = #clients > 0
else
  online = redis.call('EXISTS', KEYS[1]) == 1
end
if online
  and redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1
  and redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then
  visible = 1
end
local version = redis.call('GET', KEYS[2])
if not version then
  version = ARGV[2]
  redis.call('SET', KEYS[2], version)
end
if clients then
  return {visible, tonumber(version), clients}
end
return {visible, tonumber(version)}
