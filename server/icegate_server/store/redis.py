"""The Redis store: state shared by every replica, each counter changed by one Lua script.

Key layout (all under the prefix `icegate:`; `<p>` is a project id, `<d>` the hex SHA-256
digest of a caller key):

    icegate:project:<p>          string  the Project record as JSON
    icegate:projects             zset    every project id, score 0 (ZRANGEBYLEX pages by id)
    icegate:key:<d>              hash    key_id, project_id, admin ("1"/"0"), display_name,
                                         create_time, revoke_time, key_prefix
    icegate:keyid:<key_id>       string  <d>, to revoke by key id
    icegate:key-list:<p>         zset    the project's keys (revoked ones stay), score 0,
                                         member `api_key_cursor` (creation time, key id):
                                         ZRANGEBYLEX pages them oldest first
    icegate:admin-key-list       zset    the same for admin keys
    icegate:rl:<p>               string  GCRA TAT in ms; PX window + interval, so an idle
                                         project's TAT disappears once it could not matter
    icegate:quota:<p>:<YYYY-MM>  string  sessions begun that month; EXPIRE 62 days
    icegate:quota-months:<p>     set     the months with a counter, for delete_project
    icegate:leases:<p>           zset    live sessions: member session_id, score expiry ms
                                         (pending ones included: they hold a slot)
    icegate:pending:<p>          zset    session starts waiting on their provider, not yet
                                         counted: member session_id, score expiry ms
    icegate:pkey:<p>             hash    provider -> JSON {sealed (base64), last4,
                                         update_time_ms}
    icegate:pkey-projects        set     projects holding provider keys (list over all)
    icegate:policy:<p>           hash    provider family -> JSON {policy, update_time_ms}
    icegate:srec:<p>             hash    session id -> JSON SessionRecord fields
    icegate:srec-ends:<p>        zset    session ids with an end: member id, score ends_ms
    icegate:call-sessions        set     `<p> <session id>` of every record with a call id

Bounded work. No script works in proportion to a project's key count: ListApiKeys reads a
page (ZRANGEBYLEX, at most 1000 keys), and deleting a project removes its record, counters
and provider keys in one script (its keys are refused from then on, their project being
gone), then its keys `PURGE_BATCH` at a time, one script each. `create_project` finishes
what a deletion cut short before it creates. Listings kept by earlier versions in sets
(`icegate:keys:<p>`, `icegate:admin-keys`) are moved into the sorted sets at open, in
batches of the same size.

`admit` resolves the project from the key inside its script, so keys are not all declared
up front: this needs a single Redis primary (standalone, or Sentinel-managed), not Redis
Cluster.

Failing fast. The client has explicit socket and connect timeouts (`timeout`, 0.1 s by
default) and redis-py's retries are switched off: a call that times out may already have
run on the server, and blindly re-sending a counting script would count twice. A restarted
Redis needs no retry anyway: the pool checks a pooled connection for EOF before using it
and reconnects (RESP2 keeps that check on), and the admissions' connection (below) hears
Redis close it as it happens and opens a new one for the next batch. Every
connection-level failure becomes `StoreUnavailableError`, and so does a master's NOREPLICAS
(`min-replicas-to-write`: too few replicas in sync to accept a write).

Sentinel. With `redis+sentinel://` the client is redis-py's Sentinel `master_for`: every
connection it opens, the admissions' included, first asks the sentinels for the master's
address, so what a failover drops reconnects to the new master by itself; meanwhile calls
fail `StoreUnavailableError` (docs/RELIABILITY.md, "Redis Sentinel", has what a failover
costs and what it can lose).

A paused (or very slow) Redis brings one more hazard: a script the client gave up on sits
in the server's socket buffer and runs when Redis wakes up, counting a call whose caller was
told "unavailable". The counting scripts (`admit`, `begin_session`, `confirm_session`,
`cancel_session`) are therefore fenced: the caller sends a deadline, half the timeout ahead,
expressed on the server's clock (the offset between the clocks is measured from `TIME` at
open and from the replies: every reply through redis-py, the first of each batch of
admissions), and a script that starts after it changes nothing and answers "late". A late
answer is certain to have changed nothing, so that call alone is retried once at once. The
fence uses the real wall clock; the limits themselves use the injected `now_ms`.

Admissions. Every credential call runs `admit`, and only it bypasses redis-py: its EVALSHA
goes out on a connection of its own (`redis_admission.AdmissionConnection`: redis-py opens
it, an asyncio protocol writes packed bytes and reads replies with hiredis). One batch of
admissions is on the wire at a time; the admissions that arrive while it is go out together
as the next one (one write, the replies read in order), so batches grow with the load by
themselves and a lone call goes out on the next turn of the loop. The replies stay bytes:
each caller's key record and project are rebuilt only when what Redis sent differs from
last time. Each script in the batch is still atomic on its own and fenced by the batch's
deadline; a batch not answered within `timeout` fails, its connection is dropped, and
nothing is re-sent; a late answer or an error reply (NOSCRIPT after a restart or a SCRIPT
FLUSH) sends that call alone through redis-py, which loads the script again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from icegate_server.errors import StoreUnavailableError
from icegate_server.projects.records import DEFAULT_PROJECT_ID, ApiKey, Project
from icegate_server.store.base import (
    PURGE_BATCH,
    Admission,
    AdmitOutcome,
    ProviderKeyRecord,
    SessionAdmission,
    SessionOutcome,
    SessionPolicyRecord,
    SessionRecord,
    TurnAdmission,
    TurnAllocationEvent,
    TurnMeterState,
    TurnProjectChange,
    TurnSecretRecord,
    TurnUsageFigures,
    api_key_cursor,
    month_of,
    parse_api_key_cursor,
)
from icegate_server.store.redis_admission import AdmissionConnection
from icegate_server.store.sentinel_url import SentinelUrl, is_sentinel_url, parse_sentinel_url

PREFIX = "icegate:"
MAX_CONNECTIONS = 512
"""Connections one process opens to Redis at most (each in-flight store call holds one)."""
QUOTA_TTL_SECONDS = 62 * 86400
"""A month's session counter lives 62 days after its last increment: past the month's end."""
HEALTH_CHECK_INTERVAL_SECONDS = 1
"""A pooled connection idle longer than this is PINGed (within `timeout`) before use."""

# Every fenced script starts with this: the server's clock, and a refusal past the deadline.
_FENCE = """
local now_parts = redis.call('TIME')
local server_ms = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local clock = string.format('%.0f', server_ms)
if server_ms > tonumber(ARGV[1]) then return {clock, 'late'} end
"""

# ARGV: deadline, prefix, digest hex ('' for a static admin), project id, now_ms, count
# ('1'/'0'), default project id, TURN ('1' for a call issuing TURN credentials, else ''),
# TURN subject, month. Returns {clock, outcome, key hash fields | false, project JSON | false,
# TAT | false}, and for an admitted TURN call {..., live allocations, the month's relayed
# bytes, revoked until ms}.
_ADMIT = _FENCE + """
local prefix, digest, project_id = ARGV[2], ARGV[3], ARGV[4]
local function turn_state()
  if ARGV[8] ~= '1' then return end
  return redis.call('SCARD', prefix .. 'turn-live:' .. project_id),
         redis.call('GET', prefix .. 'turn-bytes:' .. project_id .. ':' .. ARGV[10]) or '0',
         redis.call('HGET', prefix .. 'turn-revoked:' .. project_id, ARGV[9]) or '0'
end
local now = tonumber(ARGV[5])
local key = false
if digest ~= '' then
  local fields = redis.call('HGETALL', prefix .. 'key:' .. digest)
  if #fields == 0 then return {clock, 'unknown_key'} end
  local record = {}
  for i = 1, #fields, 2 do record[fields[i]] = fields[i + 1] end
  if tonumber(record['revoke_time']) > 0 then return {clock, 'unknown_key'} end
  key = fields
  if record['admin'] ~= '1' then
    if project_id ~= '' and project_id ~= record['project_id'] then
      return {clock, 'forbidden', key}
    end
    project_id = record['project_id']
  end
end
if project_id == '' then project_id = ARGV[7] end
local project_json = redis.call('GET', prefix .. 'project:' .. project_id)
if not project_json then return {clock, 'no_project', key} end
local rate_key = prefix .. 'rl:' .. project_id
local stored = redis.call('GET', rate_key)
if ARGV[6] ~= '1' then return {clock, 'admitted', key, project_json, stored, turn_state()} end

-- limits.gcra_admit, in integer milliseconds (all values are far below 2^53).
local project = cjson.decode(project_json)
local limit = tonumber(project['rate_limit_requests'])
local window = tonumber(project['rate_limit_window_seconds']) * 1000
local interval = math.floor(window / limit)
if interval * limit < window then interval = interval + 1 end
local base = now
local tat = tonumber(stored)
if tat and tat > now then base = tat end
local candidate = base + interval
if candidate - now > window then return {clock, 'rate_limited', key, project_json, stored} end
local new_tat = string.format('%.0f', candidate)
redis.call('SET', rate_key, new_tat, 'PX', string.format('%.0f', window + interval))
return {clock, 'admitted', key, project_json, new_tat, turn_state()}
"""

# KEYS: leases, month counter, pending, provider keys, session TURN dues, session TURN
# usernames. ARGV: deadline, session id, now_ms, pending_ms, quota, max_concurrent, provider,
# TURN username, the session's member in the TURN keys ('' when none).
# -> {clock, outcome, active, held, provider key JSON (when started)}.
_BEGIN_SESSION = _FENCE + """
local provider_key = redis.call('HGET', KEYS[4], ARGV[7])
if not provider_key then return {clock, 'no_provider_key', 0, 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[3])
local active = redis.call('ZCARD', KEYS[1])
-- Units held: the month's confirmed sessions and the starts in flight.
local held = tonumber(redis.call('GET', KEYS[2]) or '0') + redis.call('ZCARD', KEYS[3])
-- Concurrency first: a caller at its concurrent limit should end a session, which a quota
-- error would not tell it.
if active >= tonumber(ARGV[6]) then return {clock, 'concurrent_limit', active, held} end
if held >= tonumber(ARGV[5]) then return {clock, 'quota_exceeded', active, held} end
local expiry = string.format('%.0f', tonumber(ARGV[3]) + tonumber(ARGV[4]))
redis.call('ZADD', KEYS[1], expiry, ARGV[2])
redis.call('ZADD', KEYS[3], expiry, ARGV[2])
if ARGV[9] and ARGV[9] ~= '' then
  redis.call('ZADD', KEYS[5], expiry, ARGV[9])
  redis.call('HSET', KEYS[6], ARGV[9], ARGV[8])
end
return {clock, 'started', active + 1, held + 1, provider_key}
"""

# KEYS: leases, month counter, months set, pending, session TURN dues. ARGV: deadline, session
# id, month, now_ms, lease_ms, counter TTL seconds, the session's TURN member.
# -> {clock, 'confirmed' | 'lapsed'}.
_CONFIRM_SESSION = _FENCE + """
local pending = redis.call('ZSCORE', KEYS[4], ARGV[2])
if not pending then
  -- Confirmed already (counted once), or cancelled or expired.
  if redis.call('ZSCORE', KEYS[1], ARGV[2]) then return {clock, 'confirmed'} end
  return {clock, 'lapsed'}
end
redis.call('ZREM', KEYS[4], ARGV[2])
if tonumber(pending) <= tonumber(ARGV[4]) then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return {clock, 'lapsed'}
end
redis.call('ZADD', KEYS[1], string.format('%.0f', tonumber(ARGV[4]) + tonumber(ARGV[5])), ARGV[2])
if KEYS[5] then
  redis.call('ZADD', KEYS[5], 'XX', string.format('%.0f', tonumber(ARGV[4]) + tonumber(ARGV[5])),
             ARGV[7])
end
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[6])
return {clock, 'confirmed'}
"""

# KEYS: leases, month counter, pending, session TURN dues, session TURN usernames. ARGV:
# deadline, session id, the session's TURN member. A pending lease is dropped; a confirmed one
# (live or expired) is dropped and uncounted; its TURN credential was never handed out.
_CANCEL_SESSION = _FENCE + """
if KEYS[5] then
  redis.call('ZREM', KEYS[4], ARGV[3])
  redis.call('HDEL', KEYS[5], ARGV[3])
end
local was_pending = redis.call('ZREM', KEYS[3], ARGV[2]) == 1
if redis.call('ZREM', KEYS[1], ARGV[2]) == 1 and not was_pending then
  if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then redis.call('DECR', KEYS[2]) end
end
return {clock, 'done'}
"""

# KEYS: leases, session TURN dues. ARGV: now_ms, new expiry, session id, the session's TURN
# member.
_RENEW_SESSION = """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[3])
if not expiry or tonumber(expiry) <= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[3])
if KEYS[2] then redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[4]) end
return 1
"""

# KEYS: leases, session TURN dues. ARGV: now_ms, session id, the session's TURN member. 1 if a
# live lease was released; its TURN allocations are due to end now.
_END_SESSION = """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not expiry then return 0 end
redis.call('ZREM', KEYS[1], ARGV[2])
if KEYS[2] then redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[3]) end
if tonumber(expiry) > tonumber(ARGV[1]) then return 1 end
return 0
"""

# KEYS: month counter, leases. ARGV: now_ms. {sessions this month, live leases}.
_SESSION_COUNTS = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
return {used, redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[1], '+inf')}
"""

# Removes up to ARGV[2] keys of the listing KEYS[3] (records, id lookups, members); ARGV[1]
# is the prefix. Leaves `remaining`: the keys still listed.
_PURGE_KEYS = """
local members = redis.call('ZRANGE', KEYS[3], 0, tonumber(ARGV[2]) - 1)
for _, member in ipairs(members) do
  local key_id = string.sub(member, 18)
  local digest = redis.call('GET', ARGV[1] .. 'keyid:' .. key_id)
  if digest then redis.call('DEL', ARGV[1] .. 'key:' .. digest) end
  redis.call('DEL', ARGV[1] .. 'keyid:' .. key_id)
end
if #members > 0 then redis.call('ZREM', KEYS[3], unpack(members)) end
local remaining = redis.call('ZCARD', KEYS[3])
"""

# KEYS: project record, project index, the project's key listing. ARGV: prefix, batch,
# record JSON, project id. 1 created, 0 exists already, -1 keys of a deleted project with
# that id are still being removed (call again).
_CREATE_PROJECT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
""" + _PURGE_KEYS + """
if remaining > 0 then return -1 end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], 0, ARGV[4])
return 1
"""

# KEYS: project index. ARGV: prefix, lower bound for ZRANGEBYLEX, limit.
_LIST_PROJECTS = """
local records = {}
local ids = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[2], '+', 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local record = redis.call('GET', ARGV[1] .. 'project:' .. id)
  if record then records[#records + 1] = record end
end
return records
"""

# ARGV: prefix, project id. 1 if the project existed. Everything the project owns but its
# keys (see _PURGE_PROJECT_KEYS), in one step: the record first, so its keys are refused at
# once. UNLINK frees the leases set (as large as max_concurrent_sessions) off the main thread;
# the months set holds the two or three months whose counters have not expired.
_DELETE_PROJECT = """
local prefix, id = ARGV[1], ARGV[2]
local existed = redis.call('DEL', prefix .. 'project:' .. id)
redis.call('ZREM', prefix .. 'projects', id)
redis.call('UNLINK', prefix .. 'rl:' .. id, prefix .. 'leases:' .. id, prefix .. 'pkey:' .. id,
           prefix .. 'pending:' .. id, prefix .. 'policy:' .. id, prefix .. 'srec:' .. id,
           prefix .. 'srec-ends:' .. id, prefix .. 'turn-live:' .. id,
           prefix .. 'turn-user-live:' .. id, prefix .. 'turn-revoked:' .. id)
redis.call('SREM', prefix .. 'pkey-projects', id)
for _, month in ipairs(redis.call('SMEMBERS', prefix .. 'quota-months:' .. id)) do
  redis.call('UNLINK', prefix .. 'quota:' .. id .. ':' .. month,
             prefix .. 'turn-bytes:' .. id .. ':' .. month,
             prefix .. 'turn-users:' .. id .. ':' .. month)
end
redis.call('DEL', prefix .. 'quota-months:' .. id)
return existed
"""

# KEYS: project record, project index (unused), the project's key listing. ARGV: prefix,
# batch. The keys still
# listed after this step; a project made again meanwhile (it cannot be: _CREATE_PROJECT
# waits for the listing to empty) keeps its keys.
_PURGE_PROJECT_KEYS = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
""" + _PURGE_KEYS + """
return remaining
"""

# KEYS: key hash, key id -> digest, listing, the key's project record. ARGV: digest hex,
# key id, listing member, admin ('1'/'0'), field, value, ... 0 if a project key's project
# does not exist (nothing written).
_CREATE_API_KEY = """
if ARGV[4] ~= '1' and redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[3])
return 1
"""

# KEYS: a listing set of an earlier version, its sorted set. ARGV: prefix, batch. Moves up to
# a batch of members; returns how many are left in the set.
_MOVE_KEY_LISTING = """
for _, key_id in ipairs(redis.call('SPOP', KEYS[1], tonumber(ARGV[2]))) do
  local digest = redis.call('GET', ARGV[1] .. 'keyid:' .. key_id)
  if digest then
    local created = redis.call('HGET', ARGV[1] .. 'key:' .. digest, 'create_time')
    if created then
      redis.call('ZADD', KEYS[2], 0, struct.pack('>d', tonumber(created)):gsub(
        '.', function(c) return string.format('%02x', string.byte(c)) end) .. ':' .. key_id)
    end
  end
end
return redis.call('SCARD', KEYS[1])
"""

# ARGV: prefix, key id, revoke_time. The key's hash fields after revocation, or nil.
_REVOKE_API_KEY = """
local digest = redis.call('GET', ARGV[1] .. 'keyid:' .. ARGV[2])
if not digest then return false end
local key = ARGV[1] .. 'key:' .. digest
if redis.call('EXISTS', key) == 0 then return false end
if tonumber(redis.call('HGET', key, 'revoke_time') or '0') == 0 then
  redis.call('HSET', key, 'revoke_time', ARGV[3])
end
return redis.call('HGETALL', key)
"""

# KEYS: listing. ARGV: prefix, ZRANGEBYLEX lower bound, limit. One array of hash fields per
# key, at most `limit`, oldest first.
_LIST_API_KEYS = """
local keys = {}
local members = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[2], '+', 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(members) do
  local digest = redis.call('GET', ARGV[1] .. 'keyid:' .. string.sub(member, 18))
  if digest then
    local fields = redis.call('HGETALL', ARGV[1] .. 'key:' .. digest)
    if #fields > 0 then keys[#keys + 1] = fields end
  end
end
return keys
"""

# KEYS: project's provider hash, projects set. ARGV: project id, provider, record JSON.
_PUT_PROVIDER_KEY = """
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# KEYS: project's provider hash, projects set. ARGV: project id, provider.
_DELETE_PROVIDER_KEY = """
local deleted = redis.call('HDEL', KEYS[1], ARGV[2])
if redis.call('HLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[1]) end
return deleted
"""

# KEYS: project record, policy hash. ARGV: provider, record JSON. 0 (nothing written) when
# the project does not exist.
_PUT_SESSION_POLICY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS: records hash, ends zset, call-sessions set. ARGV: session id, record JSON, ends_ms
# (0: none), now_ms, call-sessions member ('' when the record has no call). Drops the
# records without a call that ended by now (a call's record waits for take_ended_calls),
# then keeps this one.
_PUT_SESSION_RECORD = """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])) do
  local record = redis.call('HGET', KEYS[1], id)
  if not record or cjson.decode(record)['call_id'] == '' then
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) end
if ARGV[5] ~= '' then redis.call('SADD', KEYS[3], ARGV[5]) end
return 1
"""

# KEYS: records hash, ends zset, call-sessions set. ARGV: session id, call-sessions member.
# The record's JSON, or false.
_TAKE_SESSION_RECORD = """
local record = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[2])
return record
"""

# KEYS: call-sessions set. ARGV: prefix, now_ms, limit. Flat {project, session, record JSON,
# ...} of the calls whose lease is not live, removed as they are returned. Works in
# proportion to the calls in flight (each holds a lease, bounded by the projects' limits).
_TAKE_ENDED_CALLS = """
local prefix, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if #out >= limit * 3 then break end
  local space = string.find(member, ' ', 1, true)
  local project, session = string.sub(member, 1, space - 1), string.sub(member, space + 1)
  local expiry = redis.call('ZSCORE', prefix .. 'leases:' .. project, session)
  if not expiry or tonumber(expiry) <= now then
    local records = prefix .. 'srec:' .. project
    local record = redis.call('HGET', records, session)
    redis.call('HDEL', records, session)
    redis.call('ZREM', prefix .. 'srec-ends:' .. project, session)
    redis.call('SREM', KEYS[1], member)
    if record then
      out[#out + 1] = project
      out[#out + 1] = session
      out[#out + 1] = record
    end
  end
end
return out
"""

# KEYS: the ring hash. ARGV: new id, new record JSON, now ms, retire-at ms, min age ms.
# Fields hold JSON {sealed, created_ms, retire_at_ms}; the signer has retire_at_ms 0.
_ROTATE_TURN_RING = """
local ring = redis.call('HGETALL', KEYS[1])
local cutoff = tonumber(ARGV[3]) - tonumber(ARGV[5])
for i = 2, #ring, 2 do
  local record = cjson.decode(ring[i])
  if record.retire_at_ms == 0 and record.created_ms > cutoff then return 0 end
end
for i = 1, #ring, 2 do
  local record = cjson.decode(ring[i + 1])
  if record.retire_at_ms == 0 then
    record.retire_at_ms = tonumber(ARGV[4])
    redis.call('HSET', KEYS[1], ring[i], cjson.encode(record))
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: the ring hash. ARGV: now ms. Deletes retired secrets, returns how many.
_PURGE_TURN_SECRETS = """
local ring = redis.call('HGETALL', KEYS[1])
local purged = 0
for i = 1, #ring, 2 do
  local record = cjson.decode(ring[i + 1])
  if record.retire_at_ms > 0 and record.retire_at_ms <= tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], ring[i])
    purged = purged + 1
  end
end
return purged
"""

# KEYS: projects set. ARGV: prefix. Flat {project, provider, record JSON, ...}.
_LIST_ALL_PROVIDER_KEYS = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local fields = redis.call('HGETALL', ARGV[1] .. 'pkey:' .. id)
  for i = 1, #fields, 2 do
    out[#out + 1] = id
    out[#out + 1] = fields[i]
    out[#out + 1] = fields[i + 1]
  end
end
return out
"""

# -- TURN usage (see turn/coturn_stats.py). Keys, besides those above:
#   icegate:turn-meter               hash    owner, expires, connected, changed, last_event,
#                                            batch (the owner's last batch applied)
#   icegate:turn-alloc:<allocation>  hash    p (project), u (user id), live ('1'/'0'), c (bytes
#                                            counted), swept ('1': ended by a sweep, not by
#                                            coturn); PEXPIRE `TURN_TOMBSTONE_MS` once ended
#   icegate:turn-seen                zset    live allocations by when last seen (the sweep)
#   icegate:turn-live:<p>            set     the project's live allocations (SCARD: the count)
#   icegate:turn-user-live:<p>       hash    user id -> live allocations (fields at 0 removed)
#   icegate:turn-bytes:<p>:<YYYY-MM> string  bytes relayed that month; EXPIRE 62 days
#   icegate:turn-users:<p>:<YYYY-MM> hash    b:<user> bytes, t:<user> last activity ms that
#                                            month, t: the project's; EXPIRE 62 days
#   icegate:turn-revoked:<p>         hash    subject (user or session id) -> revoked until ms;
#                                            expires with its last revocation
#   icegate:session-turn-due         zset    <p>/<session id> of sessions whose TURN
#                                            credential was handed out, by when their
#                                            allocations are to end (the lease's expiry; now
#                                            once ended)
#   icegate:session-turn-names       hash    <p>/<session id> -> that credential's username
# The months with figures join icegate:quota-months:<p>, so delete_project finds them.

# KEYS: meter hash. ARGV: owner, now_ms, lease expiry ms (0: give up), connected ('1'/'0'),
# changed_ms, last_event_ms. -> the state in force {owner, expires, connected, changed, last}.
_CLAIM_TURN_METER = """
local current = redis.call('HMGET', KEYS[1], 'owner', 'expires', 'connected', 'changed',
                           'last_event')
local now = tonumber(ARGV[2])
if current[1] and current[1] ~= ARGV[1] and tonumber(current[2]) > now then return current end
if ARGV[3] == '0' and current[1] ~= ARGV[1] then return current end
if current[1] ~= ARGV[1] then redis.call('HDEL', KEYS[1], 'batch') end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'expires', ARGV[3], 'connected', ARGV[4],
           'changed', ARGV[5], 'last_event', ARGV[6])
return {ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6]}
"""

# The allocation bookkeeping both scripts below share. `p` is the project, `u` the user id.
_TURN_ALLOCATIONS = """
local prefix, owner, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local holder = redis.call('HMGET', prefix .. 'turn-meter', 'owner', 'expires')
if holder[1] ~= owner or tonumber(holder[2] or '0') <= now then return false end
local seen = prefix .. 'turn-seen'
local changes, order = {}, {}
local function touched(p)
  if not changes[p] then changes[p] = 0; order[#order + 1] = p end
end
local function start(key, allocation, p, u, fresh)
  redis.call('HSET', key, 'p', p, 'u', u, 'live', '1', 'swept', '0')
  if fresh then redis.call('HSET', key, 'c', '0') end
  redis.call('PERSIST', key)
  redis.call('SADD', prefix .. 'turn-live:' .. p, allocation)
  redis.call('HINCRBY', prefix .. 'turn-user-live:' .. p, u, 1)
  redis.call('ZADD', seen, now, allocation)
  touched(p)
end
local function finish(key, allocation, p, u, swept)
  redis.call('HSET', key, 'live', '0', 'swept', swept)
  redis.call('PEXPIRE', key, ARGV[6])
  redis.call('SREM', prefix .. 'turn-live:' .. p, allocation)
  if redis.call('HINCRBY', prefix .. 'turn-user-live:' .. p, u, -1) <= 0 then
    redis.call('HDEL', prefix .. 'turn-user-live:' .. p, u)
  end
  redis.call('ZREM', seen, allocation)
  touched(p)
end
local function result()
  local out = {}
  for _, p in ipairs(order) do
    out[#out + 1] = p
    out[#out + 1] = redis.call('SCARD', prefix .. 'turn-live:' .. p)
    out[#out + 1] = changes[p]
  end
  return out
end
"""

# ARGV: prefix, owner, now_ms, month, figures TTL seconds, tombstone ms, batch number, then
# five per event: kind, allocation, project, user id, bytes. -> false (not the meter's
# owner), or {project, live allocations, bytes counted, ...} for each project touched ({} for
# a batch applied already).
_RECORD_TURN_EVENTS = _TURN_ALLOCATIONS + """
local month, ttl = ARGV[4], ARGV[5]
local meter = prefix .. 'turn-meter'
if tonumber(ARGV[7]) <= tonumber(redis.call('HGET', meter, 'batch') or '0') then return {} end
redis.call('HSET', meter, 'batch', ARGV[7])
local exists = {}
local function relayed(p, u, bytes)
  if bytes <= 0 then return end
  local total = prefix .. 'turn-bytes:' .. p .. ':' .. month
  redis.call('INCRBY', total, bytes)
  redis.call('EXPIRE', total, ttl)
  redis.call('HINCRBY', prefix .. 'turn-users:' .. p .. ':' .. month, 'b:' .. u, bytes)
  redis.call('SADD', prefix .. 'quota-months:' .. p, month)
  redis.call('EXPIRE', prefix .. 'quota-months:' .. p, ttl)
  changes[p] = changes[p] + bytes
end
for i = 8, #ARGV, 5 do
  local kind, allocation, p, u = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local bytes = tonumber(ARGV[i + 4])
  if exists[p] == nil then
    exists[p] = redis.call('EXISTS', prefix .. 'project:' .. p) == 1
  end
  if exists[p] then
    touched(p)
    local key = prefix .. 'turn-alloc:' .. allocation
    local record = redis.call('HMGET', key, 'live', 'c', 'p', 'u', 'swept')
    local live, known = record[1] == '1', record[1] ~= false
    if known then p, u = record[3], record[4]; touched(p) end
    if kind == 'ended' then
      if live then finish(key, allocation, p, u, '0') end
    elseif kind == 'relayed_total' then
      local counted = tonumber(record[2] or '0')
      if bytes > counted then
        relayed(p, u, bytes - counted)
        redis.call('HSET', key, 'c', bytes)
      end
      if not known then
        -- Its end without its start: remember the total, so a second one adds nothing.
        redis.call('HSET', key, 'p', p, 'u', u, 'live', '0', 'c', bytes)
        redis.call('PEXPIRE', key, ARGV[6])
      end
    else
      -- started, alive, relayed. An allocation coturn said it ended only starts again as a
      -- new one (ids start again when coturn does): an alive or relayed report of it is
      -- stale. One a sweep ended (coturn no longer listed it) lives again when reported.
      if not live and (not known or kind == 'started' or record[5] == '1') then
        start(key, allocation, p, u, kind == 'started' or not known)
      elseif live then redis.call('ZADD', seen, now, allocation) end
      if kind == 'relayed' then
        relayed(p, u, bytes)
        redis.call('HINCRBY', key, 'c', bytes)
      end
    end
    local users = prefix .. 'turn-users:' .. p .. ':' .. month
    redis.call('HSET', users, 't:' .. u, ARGV[3], 't:', ARGV[3])
    redis.call('EXPIRE', users, ttl)
  end
end
return result()
"""

# ARGV: prefix, owner, now_ms, seen-before ms, limit, tombstone ms. -> false (not the owner),
# or {ended count, project, live allocations, 0, ...}.
_SWEEP_TURN_ALLOCATIONS = _TURN_ALLOCATIONS + """
local stale = redis.call('ZRANGEBYSCORE', seen, '-inf', '(' .. ARGV[4], 'LIMIT', 0,
                         tonumber(ARGV[5]))
for _, allocation in ipairs(stale) do
  local key = prefix .. 'turn-alloc:' .. allocation
  local record = redis.call('HMGET', key, 'p', 'u')
  if record[1] then finish(key, allocation, record[1], record[2], '1')
  else redis.call('ZREM', seen, allocation) end
end
local out = result()
table.insert(out, 1, #stale)
return out
"""

# KEYS: the project's revocations hash. ARGV: subject, until ms, now ms. -> the until in force.
# The hash lives until its last revocation lapses.
_REVOKE_TURN_SUBJECT = """
local revoked = tonumber(ARGV[2])
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if current > revoked then revoked = current end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', revoked))
local wanted = revoked - tonumber(ARGV[3])
local ttl = redis.call('PTTL', KEYS[1])
if wanted > 0 and (ttl < 0 or ttl < wanted) then
  redis.call('PEXPIRE', KEYS[1], string.format('%.0f', wanted))
end
return string.format('%.0f', revoked)
"""

# KEYS: the project's revocations hash. ARGV: subject, now ms. 1 if a revocation in force was
# lifted.
_LIFT_TURN_SUBJECT = """
local revoked = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
redis.call('HDEL', KEYS[1], ARGV[1])
if revoked > tonumber(ARGV[2]) then return 1 end
return 0
"""

# KEYS: session TURN dues, session TURN usernames. ARGV: now_ms, limit. Takes (removes) the
# sessions due: {member, username, ...}.
_TAKE_ENDED_SESSION_TURN = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, member in ipairs(due) do
  out[#out + 1] = member
  out[#out + 1] = redis.call('HGET', KEYS[2], member) or ''
  redis.call('HDEL', KEYS[2], member)
end
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return out
"""

# ARGV: prefix, project, month, user id ('' for the project). -> {live, bytes, last ms}.
_TURN_USAGE = """
local prefix, p, month, u = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if u == '' then
  return {redis.call('SCARD', prefix .. 'turn-live:' .. p),
          redis.call('GET', prefix .. 'turn-bytes:' .. p .. ':' .. month) or '0',
          redis.call('HGET', prefix .. 'turn-users:' .. p .. ':' .. month, 't:') or '0'}
end
local figures = redis.call('HMGET', prefix .. 'turn-users:' .. p .. ':' .. month,
                           'b:' .. u, 't:' .. u)
return {redis.call('HGET', prefix .. 'turn-user-live:' .. p, u) or '0', figures[1] or '0',
        figures[2] or '0'}
"""


def _project_key(project_id: str) -> str:
    return f"{PREFIX}project:{project_id}"


def _leases_key(project_id: str) -> str:
    return f"{PREFIX}leases:{project_id}"


def _pending_key(project_id: str) -> str:
    return f"{PREFIX}pending:{project_id}"


def _quota_key(project_id: str, month: str) -> str:
    return f"{PREFIX}quota:{project_id}:{month}"


def _key_list_key(project_id: str) -> str:
    return f"{PREFIX}key-list:{project_id}"


def _pkey_key(project_id: str) -> str:
    return f"{PREFIX}pkey:{project_id}"


def _project_json(project: Project) -> str:
    return json.dumps(dataclasses.asdict(project), separators=(",", ":"))


_PROJECT_FIELDS = frozenset(f.name for f in dataclasses.fields(Project))


@functools.lru_cache(maxsize=16384)
def _project_from_json(text: str) -> Project:
    # Cached by the record's text, as in the SQLite store: every admission brings the
    # project's JSON back, and a changed project is a new text, so never stale.
    return Project(**{k: v for k, v in json.loads(text).items() if k in _PROJECT_FIELDS})


def _key_fields(key: ApiKey) -> dict[str, str]:
    return {
        "key_id": key.key_id,
        "project_id": key.project_id,
        "admin": "1" if key.admin else "0",
        "display_name": key.display_name,
        "create_time": repr(float(key.create_time)),
        "revoke_time": repr(float(key.revoke_time)),
        "key_prefix": key.key_prefix,
    }


def _key_from_fields(flat: Sequence[str]) -> ApiKey:
    return _key_from_field_tuple(tuple(flat))


@functools.lru_cache(maxsize=16384)
def _key_from_field_tuple(flat: tuple[str, ...]) -> ApiKey:
    fields = dict(zip(flat[0::2], flat[1::2], strict=True))
    return ApiKey(
        key_id=fields["key_id"],
        project_id=fields["project_id"],
        admin=fields["admin"] == "1",
        display_name=fields["display_name"],
        create_time=float(fields["create_time"]),
        revoke_time=float(fields["revoke_time"]),
        key_prefix=fields["key_prefix"],
    )


def _provider_json(record: ProviderKeyRecord) -> str:
    return json.dumps({
        "sealed": base64.b64encode(record.sealed).decode("ascii"),
        "last4": record.last4,
        "update_time_ms": record.update_time_ms,
    }, separators=(",", ":"))


def _provider_from_json(project_id: str, provider: str, text: str) -> ProviderKeyRecord:
    data = json.loads(text)
    return ProviderKeyRecord(project_id=project_id, provider=provider,
                             sealed=base64.b64decode(data["sealed"]), last4=data["last4"],
                             update_time_ms=int(data["update_time_ms"]))


def _text(value: bytes | str) -> str:
    # redis-py decodes replies (decode_responses=True); the admissions' connection does not.
    return value.decode() if isinstance(value, bytes) else value


def _caller_gone(call: _AdmitCall) -> bool:
    return call[1].done()  # cancelled: nothing else settles a call before its batch is sent


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():  # its caller was cancelled
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _wall_ms() -> float:
    return time.time() * 1000


# ConnectionError covers BusyLoadingError (still loading its data set) and
# AuthenticationError; ReadOnlyError means we talk to a replica after a failover.
_CONNECTION_ERRORS = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError, redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError, redis.exceptions.OutOfMemoryError, OSError, TimeoutError)
"""The failures that make the store unavailable (`StoreUnavailableError`) to a caller."""


def _sentinel_errors(text: str) -> str:
    """MasterNotFoundError's text without the sentinel clients' reprs redis-py puts in it
    (`No master found for 'name' : <repr> - error, <repr> - error`): the name, then each
    sentinel's error (unreachable, refused AUTH, certificate not verified)."""
    head, _, tail = text.partition(" : ")
    errors = [chunk.rpartition(")> - ")[2].rstrip(", ")
              for chunk in tail.split("<redis.asyncio.client.Redis(")[1:]]
    errors = list(dict.fromkeys(error for error in errors if error))
    return f"{head} ({'; '.join(errors)})" if errors else head


def _refused_for_replicas(error: BaseException) -> bool:
    """Whether `error` is a master's NOREPLICAS: with `min-replicas-to-write` set (see
    docs/RELIABILITY.md, "Redis Sentinel"), it refuses writes while too few replicas are in
    sync; a caller should retry, as when the store is down."""
    return (isinstance(error, redis.exceptions.ResponseError)
            and str(error).startswith("NOREPLICAS"))


_ADMIT_OUTCOMES: dict[bytes | str, AdmitOutcome] = {
    **{outcome.value: outcome for outcome in AdmitOutcome},
    **{outcome.value.encode(): outcome for outcome in AdmitOutcome}}
"""`_ADMIT`'s outcome, as redis-py (str) or the admissions' connection (bytes) brings it."""
_new_admission = tuple.__new__
_Admitted = tuple[list[bytes] | None, bytes, ApiKey | None, Project]
"""An admission's key fields and project JSON as Redis sent them, and what they stand for."""
_ADMIT_CACHE_SIZE = 16384
"""Callers whose packed arguments and last admission are remembered, at most (past it, each
memory starts afresh)."""

_AdmitCall = tuple[bytes, "asyncio.Future[Admission]",
                   tuple[bytes | None, str, int, bool, str | None, str]]
"""One admission waiting for its reply: `_admit_argv`, its caller's future, and what
`_admit_args` takes (for the retry through redis-py)."""


def _admit_args(digest: bytes | None, project_id: str, now_ms: int, count: bool,
                turn_subject: str | None, month: str) -> list[str | int]:
    """`_ADMIT`'s ARGV after the deadline (always as many: the TURN ones "0", "", "" for a
    call that signs no TURN credential)."""
    return [PREFIX, digest.hex() if digest is not None else "", project_id, now_ms,
            "1" if count else "0", DEFAULT_PROJECT_ID,
            "0" if turn_subject is None else "1", turn_subject or "", month]


_ADMIT_ARGC = len(_admit_args(None, "", 0, False, None, ""))
_ADMIT_NOW = 3
"""Where `now_ms` is in `_admit_args`: the one argument that changes from call to call."""
_admit_argv_parts: dict[tuple[bytes | None, str, bool, str | None, str], tuple[str, str]] = {}


def _admit_argv(digest: bytes | None, project_id: str, now_ms: int, count: bool,
                turn_subject: str | None, month: str) -> bytes:
    """`_admit_args` as RESP bulk strings, what follows the deadline in the EVALSHA.

    Packed by hand around `now_ms`, what comes before and after it remembered for each
    caller: hiredis.pack_command spends ~15k instructions on the whole EVALSHA (a sprintf
    per argument), this ~3k (callgrind, issue 16).
    """
    memory = (digest, project_id, count, turn_subject, month)
    parts = _admit_argv_parts.get(memory)
    if parts is None:
        bulks = [f"${len(str(arg).encode())}\r\n{arg}\r\n"
                 for arg in _admit_args(digest, project_id, 0, count, turn_subject, month)]
        parts = "".join(bulks[:_ADMIT_NOW]), "".join(bulks[_ADMIT_NOW + 1:])
        if len(_admit_argv_parts) >= _ADMIT_CACHE_SIZE:
            _admit_argv_parts.clear()
        _admit_argv_parts[memory] = parts
    now = str(now_ms)
    return f"{parts[0]}${len(now)}\r\n{now}\r\n{parts[1]}".encode()


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's Sentinel pool (every new connection asks the sentinels for the master's
    address; one that meets a demoted master's READONLY is dropped) that waits for a free
    connection like the standalone store's `BlockingConnectionPool`."""


def _sentinel_master(url: SentinelUrl, timeout: float,
                     options: dict[str, Any]) -> aioredis.Redis:
    """A client of the master `url` names, through redis-py's Sentinel.

    Every connection it opens, the admissions' own included (`make_connection()` then
    `connect()`), first asks the sentinels which address is the master now, so a connection
    lost in a failover comes back on the new master by itself.
    """
    tls: dict[str, Any] = {"ssl": True, **dict(url.tls_files)} if url.tls else {}
    sentinels = Sentinel(
        url.sentinels,
        # The sentinels' own connections: the store's timeouts, their own AUTH, no retry
        # (discovery moves on to the next sentinel), TLS when the master has it.
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout,
                         "username": url.sentinel_username,
                         "password": url.sentinel_password,
                         "retry": Retry(NoBackoff(), 0), "protocol": 2, **tls},
    )
    client: aioredis.Redis = sentinels.master_for(
        url.master_name, connection_pool_class=_BlockingSentinelPool,
        db=url.db, username=url.username, password=url.password, **tls, **options)
    return client


async def _close_client(client: aioredis.Redis) -> None:
    """Closes `client` and, for a Sentinel-managed one, its connections to the sentinels."""
    await client.aclose()
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        await pool.sentinel_manager.aclose()


class RedisStore:
    """The `Store` on one Redis primary, shared by every replica of the service."""

    def __init__(self, client: aioredis.Redis, *, timeout: float, linger: float = 0.0,
                 secrets: Sequence[str] = ()) -> None:
        self._redis = client
        self._secrets = [secret for secret in secrets if secret]
        """Strings never to repeat in an error message (the URL's password)."""
        self._fence_ms = timeout * 1000 / 2
        self._clock_offset_ms = 0.0
        """Redis's wall clock minus ours, in ms (see the fence in the module docstring)."""
        # The admissions' own connection (redis_admission.py), batches of `_ADMIT` calls.
        self._admissions: AdmissionConnection[_AdmitCall] = AdmissionConnection(
            self._connect_admissions, timeout=timeout, pack=self._pack_admits,
            answer=self._answer_admit, fail=self._fail_admit, gone=_caller_gone, linger=linger)
        self._admits_sent_ms = 0.0
        """When the batch of admissions on the wire was packed (our wall clock); 0 once its
        first reply set the clock offset."""
        self._admitted: dict[bytes | str, _Admitted] = {}
        """By caller (key digest, or the project named), what its last admission brought."""
        self._admit_retries: set[asyncio.Task[None]] = set()
        register = client.register_script
        self._admit = register(_ADMIT)
        sha = self._admit.sha
        self._admit_head = (f"*{4 + _ADMIT_ARGC}\r\n$7\r\nEVALSHA\r\n${len(sha)}\r\n{sha}\r\n"
                            f"$1\r\n0\r\n").encode()
        """An admission's EVALSHA up to its deadline (numkeys 0)."""
        self._begin_session = register(_BEGIN_SESSION)
        self._cancel_session = register(_CANCEL_SESSION)
        self._confirm_session = register(_CONFIRM_SESSION)
        self._renew_session = register(_RENEW_SESSION)
        self._end_session = register(_END_SESSION)
        self._session_counts = register(_SESSION_COUNTS)
        self._create_project = register(_CREATE_PROJECT)
        self._list_projects = register(_LIST_PROJECTS)
        self._delete_project = register(_DELETE_PROJECT)
        self._purge_project_keys = register(_PURGE_PROJECT_KEYS)
        self._move_key_listing = register(_MOVE_KEY_LISTING)
        self._create_api_key = register(_CREATE_API_KEY)
        self._revoke_api_key = register(_REVOKE_API_KEY)
        self._list_api_keys = register(_LIST_API_KEYS)
        self._put_provider_key = register(_PUT_PROVIDER_KEY)
        self._delete_provider_key = register(_DELETE_PROVIDER_KEY)
        self._list_all_provider_keys = register(_LIST_ALL_PROVIDER_KEYS)
        self._rotate_turn_secret = register(_ROTATE_TURN_RING)
        self._purge_turn_secrets = register(_PURGE_TURN_SECRETS)
        self._put_session_policy = register(_PUT_SESSION_POLICY)
        self._put_session_record = register(_PUT_SESSION_RECORD)
        self._take_session_record = register(_TAKE_SESSION_RECORD)
        self._take_ended_calls = register(_TAKE_ENDED_CALLS)
        self._claim_turn_meter = register(_CLAIM_TURN_METER)
        self._record_turn_events = register(_RECORD_TURN_EVENTS)
        self._sweep_turn_allocations = register(_SWEEP_TURN_ALLOCATIONS)
        self._turn_usage = register(_TURN_USAGE)
        self._revoke_turn_subject = register(_REVOKE_TURN_SUBJECT)
        self._take_ended_session_turn = register(_TAKE_ENDED_SESSION_TURN)
        self._lift_turn_subject = register(_LIFT_TURN_SUBJECT)
        self._scripts = (
            self._admit, self._begin_session, self._cancel_session, self._confirm_session,
            self._renew_session,
            self._end_session, self._session_counts, self._create_project, self._list_projects,
            self._delete_project, self._purge_project_keys, self._move_key_listing,
            self._create_api_key, self._revoke_api_key,
            self._list_api_keys, self._put_provider_key, self._delete_provider_key,
            self._list_all_provider_keys, self._rotate_turn_secret, self._purge_turn_secrets,
            self._put_session_policy, self._put_session_record, self._take_session_record,
            self._take_ended_calls,
            self._claim_turn_meter, self._record_turn_events, self._sweep_turn_allocations,
            self._turn_usage, self._revoke_turn_subject, self._take_ended_session_turn,
            self._lift_turn_subject,
        )

    @classmethod
    async def open(cls, url: str, *, timeout: float = 0.1, linger: float = 0.0) -> RedisStore:
        """Connects to the Redis at `url` and loads the scripts.

        Args:
            url: `redis://[[user]:password@]host:port/db`, `rediss://...`,
                `unix:///path/to/socket?db=0`, or a Sentinel-managed master:
                `redis+sentinel://[[user]:password@]host:port[,host:port...]/master-name[/db]`
                (`rediss+sentinel://` over TLS; sentinel_url.py has its options).
            timeout: Seconds any one Redis operation (connect, send, read) may take before
                the call fails with `StoreUnavailableError`.
            linger: Seconds a batch of admissions may wait for more calls while the event
                loop is busy (redis_admission.py); 0 sends each batch on the next loop turn.

        Raises:
            StoreUnavailableError: Redis cannot be reached now.
            ValueError: A Sentinel URL is malformed.
        """
        # A blocking pool: more concurrent calls than connections wait for one (up to the
        # store timeout) instead of failing at once with "Too many connections".
        options: dict[str, Any] = dict(
            max_connections=MAX_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # No retries: see "Failing fast" in the module docstring.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS,
            decode_responses=True,
            client_name="icegate",
            # RESP2: under RESP3 redis-py enables maintenance notifications, which turn off
            # its check that a pooled connection was not closed by the server, so the first
            # call after a Redis restart would fail on a dead connection.
            protocol=2,
        )
        if is_sentinel_url(url):
            sentinel_url = parse_sentinel_url(url)
            client = _sentinel_master(sentinel_url, timeout, options)
            passwords: list[str] = list(sentinel_url.secrets)
        else:
            client = aioredis.Redis.from_pool(
                aioredis.BlockingConnectionPool.from_url(url, **options))
            parts = urlsplit(url)
            passwords = [parts.password or "", *parse_qs(parts.query).get("password", [])]
        store = cls(client, timeout=timeout, linger=linger,
                    secrets=[*passwords, *(unquote(p) for p in passwords)])
        try:
            with store._unavailable_on_error():
                for script in store._scripts:
                    await client.script_load(script.script)
                sent = _wall_ms()
                seconds, micros = await client.time()
                store._clock_offset_ms = seconds * 1000 + micros / 1000 - (sent + _wall_ms()) / 2
            await store._move_key_listings()
        except BaseException:
            await _close_client(client)
            raise
        return store

    @contextlib.contextmanager
    def _unavailable_on_error(self) -> Iterator[None]:
        try:
            yield
        except _CONNECTION_ERRORS as error:
            raise self._unavailable(error) from None
        except redis.exceptions.ResponseError as error:
            if not _refused_for_replicas(error):
                raise
            raise self._unavailable(error) from None

    def _unavailable(self, error: BaseException) -> BaseException:
        """What a caller sees of `error`: a connection-level failure (`_CONNECTION_ERRORS`)
        becomes `StoreUnavailableError`, with the URL's password scrubbed; others stay."""
        if not (isinstance(error, _CONNECTION_ERRORS) or _refused_for_replicas(error)):
            return error
        text = str(error)
        if isinstance(error, MasterNotFoundError):
            text = _sentinel_errors(text)
        reason = f"{type(error).__name__}: {text}".splitlines()[0][:200]
        for secret in self._secrets:
            reason = reason.replace(secret, "***")
        return StoreUnavailableError(f"Redis store unavailable: {reason}")

    async def _call(self, script: AsyncScript, keys: Sequence[str],
                    args: Sequence[str | int]) -> Any:
        with self._unavailable_on_error():
            return await script(keys=list(keys), args=list(args))

    async def _fenced(self, script: AsyncScript, keys: Sequence[str],
                      args: Sequence[str | int]) -> list[Any]:
        """Runs a counting script that refuses to start after its deadline (see above)."""
        for _attempt in range(2):
            sent = _wall_ms()
            deadline = int(sent + self._clock_offset_ms + self._fence_ms)
            reply = await self._call(script, keys, [deadline, *args])
            late = reply[1] == "late"
            self._learn_clock(reply, sent, _wall_ms(), late=late)
            if not late:
                return list(reply[1:])
        raise StoreUnavailableError("Redis store unavailable: it ran the call after its deadline")

    def _learn_clock(self, reply: Sequence[Any], sent: float, received: float, *,
                     late: bool) -> None:
        # A fenced reply starts with Redis's clock. A slow round trip measures the offset
        # badly; a late answer says the offset in use is wrong.
        if late or received - sent < self._fence_ms:
            self._clock_offset_ms = int(reply[0]) - (sent + received) / 2

    async def _move_key_listings(self) -> None:
        """Moves the key listings of earlier versions (sets) into sorted sets, a batch per
        script: SCAN finds them, a bounded step at a time."""
        with self._unavailable_on_error():
            old = [key async for key in self._redis.scan_iter(match=f"{PREFIX}keys:*",
                                                                count=1000, _type="set")]
            if await self._redis.type(f"{PREFIX}admin-keys") == "set":
                old.append(f"{PREFIX}admin-keys")
        for key in old:
            listing = (f"{PREFIX}admin-key-list" if key == f"{PREFIX}admin-keys"
                       else _key_list_key(key.removeprefix(f"{PREFIX}keys:")))
            while await self._call(self._move_key_listing, [key, listing],
                                   [PREFIX, PURGE_BATCH]):
                pass

    async def ping(self) -> None:
        with self._unavailable_on_error():
            await self._redis.ping()

    async def close(self) -> None:
        await self._admissions.close()
        await asyncio.gather(*self._admit_retries, return_exceptions=True)
        await _close_client(self._redis)

    # -- projects ---------------------------------------------------------------------------

    async def create_project(self, project: Project) -> bool:
        keys = [_project_key(project.project_id), f"{PREFIX}projects",
                _key_list_key(project.project_id)]
        args: list[str | int] = [PREFIX, PURGE_BATCH, _project_json(project), project.project_id]
        # -1: keys of a deleted project with this id are left; each call removes a batch.
        while (created := int(await self._call(self._create_project, keys, args))) < 0:
            pass
        return created == 1

    async def get_project(self, project_id: str) -> Project | None:
        with self._unavailable_on_error():
            record = await self._redis.get(_project_key(project_id))
        return _project_from_json(_text(record)) if record is not None else None

    async def list_projects(self, *, after: str, limit: int) -> list[Project]:
        if limit <= 0:
            return []
        records = await self._call(self._list_projects, [f"{PREFIX}projects"],
                                   [PREFIX, f"({after}" if after else "-", limit])
        return [_project_from_json(record) for record in records]

    async def update_project(self, project: Project) -> bool:
        with self._unavailable_on_error():
            replaced = await self._redis.set(_project_key(project.project_id),
                                             _project_json(project), xx=True)
        return bool(replaced)

    async def delete_project(self, project_id: str, now_ms: int) -> bool:
        existed = await self._call(self._delete_project, [], [PREFIX, project_id])
        keys = [_project_key(project_id), f"{PREFIX}projects", _key_list_key(project_id)]
        while await self._call(self._purge_project_keys, keys, [PREFIX, PURGE_BATCH]):
            pass
        return bool(existed)

    # -- caller keys ------------------------------------------------------------------------

    async def create_api_key(self, key: ApiKey, digest: bytes) -> bool:
        listing = (f"{PREFIX}admin-key-list" if key.admin
                   else _key_list_key(key.project_id))
        fields = [item for pair in _key_fields(key).items() for item in pair]
        created = await self._call(
            self._create_api_key,
            [f"{PREFIX}key:{digest.hex()}", f"{PREFIX}keyid:{key.key_id}", listing,
             _project_key(key.project_id)],
            [digest.hex(), key.key_id, api_key_cursor(key), "1" if key.admin else "0",
             *fields])
        return bool(created)

    async def list_api_keys(self, project_id: str | None, *, after: str,
                            limit: int) -> list[ApiKey]:
        if limit <= 0 or (after and parse_api_key_cursor(after) is None):
            return []
        listing = f"{PREFIX}admin-key-list" if project_id is None else _key_list_key(project_id)
        records = await self._call(self._list_api_keys, [listing],
                                   [PREFIX, f"({after}" if after else "-", limit])
        return [_key_from_fields(record) for record in records]

    async def revoke_api_key(self, key_id: str, now_ms: int) -> ApiKey | None:
        fields = await self._call(self._revoke_api_key, [],
                                  [PREFIX, key_id, repr(now_ms / 1000)])
        return _key_from_fields(fields) if fields else None

    # -- the hot path -----------------------------------------------------------------------

    async def admit(self, *, digest: bytes | None, project_id: str, now_ms: int,
                    count: bool, turn_subject: str | None = None,
                    may_linger: bool = False) -> Admission:
        month = month_of(now_ms) if turn_subject is not None else ""
        future: asyncio.Future[Admission] = asyncio.get_running_loop().create_future()
        self._admissions.submit((
            _admit_argv(digest, project_id, now_ms, count, turn_subject, month), future,
            (digest, project_id, now_ms, count, turn_subject, month)), may_linger)
        return await future

    async def _connect_admissions(self) -> aioredis.connection.AbstractConnection:
        # A connection of the pool's kind (TCP, TLS or Unix; AUTH, SELECT, timeouts) that
        # the pool does not hand out: the admissions keep it to themselves.
        connection: aioredis.connection.AbstractConnection = \
            self._redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        await connection.connect()  # type: ignore[no-untyped-call]
        return connection

    def _pack_admits(self, batch: list[_AdmitCall]) -> bytes:
        # One deadline for the batch, computed as it is written (see the fence above).
        sent = self._admits_sent_ms = _wall_ms()
        deadline = str(int(sent + self._clock_offset_ms + self._fence_ms))
        head = self._admit_head + f"${len(deadline)}\r\n{deadline}\r\n".encode()
        if len(batch) == 1:
            return head + batch[0][0]
        return head + head.join([call[0] for call in batch])

    def _answer_admit(self, call: _AdmitCall, reply: Any) -> None:
        # `reply` comes undecoded (bytes): decoding its ~20 strings cost 6k instructions of
        # a 17k parse, more than comparing them with the caller's last ones below.
        future = call[1]
        if type(reply) is not list or reply[1] == b"late":
            # Late (it changed nothing), or an error reply (NOSCRIPT: a restarted or flushed
            # Redis forgot the script): alone, through redis-py, which re-checks the clock
            # and loads the script again.
            task = asyncio.get_running_loop().create_task(
                self._admit_alone(_admit_args(*call[2]), future))
            self._admit_retries.add(task)
            task.add_done_callback(self._admit_retries.discard)
            return
        sent = self._admits_sent_ms
        if sent:  # the batch's first reply: Redis's clock, once a batch (see _learn_clock)
            self._admits_sent_ms = 0.0
            received = _wall_ms()
            if received - sent < self._fence_ms:
                self._clock_offset_ms = int(reply[0]) - (sent + received) / 2
        if future.done():  # its caller was cancelled
            return
        size = len(reply)
        if size == 5 or size == 8:  # admitted or rate limited, with a key or not
            _, outcome, fields, project_json, tat = reply[:5]
            # What this caller's admissions brought back last time, compared in full.
            caller = call[2][0] or call[2][1]  # its key's digest, or the project it names
            seen = self._admitted.get(caller)
            if seen is None or seen[0] != fields or seen[1] != project_json:
                seen = self._remember_admitted(caller, fields, project_json)
            # Admission(...) without its Python-level __new__ (a namedtuple's is one).
            future.set_result(_new_admission(Admission, (
                _ADMIT_OUTCOMES[outcome], seen[2], seen[3], int(tat) if tat is not None else None,
                TurnAdmission(int(reply[5]), int(reply[6]), int(reply[7])) if size == 8
                else None)))
            return
        try:
            admission = self._admission(reply)
        except Exception as error:  # a reply of another shape: that caller's error alone
            future.set_exception(error)
        else:
            future.set_result(admission)

    def _remember_admitted(self, caller: bytes | str, fields: list[bytes] | None,
                           project_json: bytes) -> _Admitted:
        seen = (fields, project_json,
                _key_from_fields([_text(f) for f in fields]) if fields else None,
                _project_from_json(_text(project_json)))
        if len(self._admitted) >= _ADMIT_CACHE_SIZE:
            self._admitted.clear()
        self._admitted[caller] = seen
        return seen

    async def _admit_alone(self, args: list[str | int],
                           future: asyncio.Future[Admission]) -> None:
        try:
            reply = await self._fenced(self._admit, [], args)
            _settle(future, self._admission([None, *reply]))
        except Exception as error:
            _settle(future, error)

    def _fail_admit(self, call: _AdmitCall, error: BaseException) -> None:
        if not isinstance(error, Exception):  # cancelled: the store is closing
            error = StoreUnavailableError("Redis store unavailable: closing")
        _settle(call[1], self._unavailable(error))

    def _admission(self, reply: list[Any]) -> Admission:
        """The `_ADMIT` reply {clock, outcome, key fields, project JSON, TAT, and for a call
        that signs TURN credentials live allocations, relayed bytes, revoked until}, its tail
        possibly missing, in bytes (the admissions' connection) or str (redis-py's)."""
        if len(reply) < 8:
            reply += [None] * (8 - len(reply))
        _, outcome, fields, project_json, tat, live, relayed, revoked = reply
        return Admission(_ADMIT_OUTCOMES[outcome],
                         _key_from_fields([_text(f) for f in fields]) if fields else None,
                         _project_from_json(_text(project_json)) if project_json else None,
                         int(tat) if tat is not None else None,
                         TurnAdmission(int(live), int(relayed), int(revoked))
                         if live is not None else None)

    async def rate_position(self, project_id: str) -> int | None:
        with self._unavailable_on_error():
            tat = await self._redis.get(f"{PREFIX}rl:{project_id}")
        return int(tat) if tat is not None else None

    # -- sessions ---------------------------------------------------------------------------

    async def begin_session(self, *, project_id: str, session_id: str, month: str,
                            now_ms: int, pending_ms: int, quota: int, max_concurrent: int,
                            provider: str, turn_username: str = "") -> SessionAdmission:
        outcome, active, held, *key = await self._fenced(
            self._begin_session,
            [_leases_key(project_id), _quota_key(project_id, month), _pending_key(project_id),
             _pkey_key(project_id), _SESSION_TURN_DUE, _SESSION_TURN_NAMES],
            [session_id, now_ms, pending_ms, quota, max_concurrent, provider, turn_username,
             _session_turn_member(project_id, session_id) if turn_username else ""])
        record = _provider_from_json(project_id, provider, _text(key[0])) if key else None
        return SessionAdmission(SessionOutcome(outcome), int(active), int(held), record)

    async def confirm_session(self, *, project_id: str, session_id: str, month: str,
                              now_ms: int, lease_ms: int) -> bool:
        [outcome] = await self._fenced(
            self._confirm_session,
            [_leases_key(project_id), _quota_key(project_id, month),
             f"{PREFIX}quota-months:{project_id}", _pending_key(project_id), _SESSION_TURN_DUE],
            [session_id, month, now_ms, lease_ms, QUOTA_TTL_SECONDS,
             _session_turn_member(project_id, session_id)])
        return bool(outcome == "confirmed")

    async def renew_session(self, *, project_id: str, session_id: str, now_ms: int,
                            lease_ms: int) -> bool:
        renewed = await self._call(self._renew_session,
                                   [_leases_key(project_id), _SESSION_TURN_DUE],
                                   [now_ms, now_ms + lease_ms, session_id,
                                    _session_turn_member(project_id, session_id)])
        return bool(renewed)

    async def end_session(self, *, project_id: str, session_id: str, now_ms: int) -> bool:
        ended = await self._call(self._end_session,
                                 [_leases_key(project_id), _SESSION_TURN_DUE],
                                 [now_ms, session_id,
                                  _session_turn_member(project_id, session_id)])
        return bool(ended)

    async def cancel_session(self, *, project_id: str, session_id: str, month: str) -> None:
        await self._fenced(self._cancel_session,
                           [_leases_key(project_id), _quota_key(project_id, month),
                            _pending_key(project_id), _SESSION_TURN_DUE, _SESSION_TURN_NAMES],
                           [session_id, _session_turn_member(project_id, session_id)])

    async def session_counts(self, *, project_id: str, month: str,
                             now_ms: int) -> tuple[int, int]:
        used, active = await self._call(
            self._session_counts, [_quota_key(project_id, month), _leases_key(project_id)],
            [now_ms])
        return int(used), int(active)

    # -- provider keys ----------------------------------------------------------------------

    async def put_provider_key(self, record: ProviderKeyRecord) -> None:
        await self._call(self._put_provider_key,
                         [_pkey_key(record.project_id), f"{PREFIX}pkey-projects"],
                         [record.project_id, record.provider, _provider_json(record)])

    async def get_provider_key(self, project_id: str, provider: str) -> ProviderKeyRecord | None:
        with self._unavailable_on_error():
            text = await self._redis.hget(_pkey_key(project_id), provider)
        if text is None:
            return None
        return _provider_from_json(project_id, provider, _text(text))

    async def list_provider_keys(self, project_id: str | None) -> list[ProviderKeyRecord]:
        if project_id is None:
            flat = await self._call(self._list_all_provider_keys, [f"{PREFIX}pkey-projects"],
                                    [PREFIX])
            records = [_provider_from_json(p, provider, text)
                       for p, provider, text in zip(flat[0::3], flat[1::3], flat[2::3],
                                                    strict=True)]
        else:
            with self._unavailable_on_error():
                fields = await self._redis.hgetall(_pkey_key(project_id))
            records = [_provider_from_json(project_id, _text(provider), _text(text))
                       for provider, text in fields.items()]
        return sorted(records, key=lambda r: (r.project_id, r.provider))

    async def delete_provider_key(self, project_id: str, provider: str) -> bool:
        deleted = await self._call(self._delete_provider_key,
                                   [_pkey_key(project_id), f"{PREFIX}pkey-projects"],
                                   [project_id, provider])
        return bool(deleted)

    # -- session policies and session records -------------------------------------------------

    async def put_session_policy(self, record: SessionPolicyRecord) -> bool:
        text = json.dumps({"policy": record.policy_json,
                           "update_time_ms": record.update_time_ms})
        written = await self._call(self._put_session_policy,
                                   [_project_key(record.project_id),
                                    f"{PREFIX}policy:{record.project_id}"],
                                   [record.provider, text])
        return bool(written)

    async def get_session_policy(self, project_id: str,
                                 provider: str) -> SessionPolicyRecord | None:
        with self._unavailable_on_error():
            text = await self._redis.hget(f"{PREFIX}policy:{project_id}", provider)
        if text is None:
            return None
        data = json.loads(_text(text))
        return SessionPolicyRecord(project_id, provider, str(data["policy"]),
                                   int(data["update_time_ms"]))

    async def delete_session_policy(self, project_id: str, provider: str) -> bool:
        with self._unavailable_on_error():
            deleted = await self._redis.hdel(f"{PREFIX}policy:{project_id}", provider)
        return bool(deleted)

    async def put_session_record(self, record: SessionRecord, now_ms: int) -> None:
        text = json.dumps({"provider": record.provider, "ends_ms": record.ends_ms,
                           "call_id": record.call_id})
        member = f"{record.project_id} {record.session_id}" if record.call_id else ""
        await self._call(self._put_session_record,
                         [f"{PREFIX}srec:{record.project_id}",
                          f"{PREFIX}srec-ends:{record.project_id}", _CALL_SESSIONS],
                         [record.session_id, text, record.ends_ms, now_ms, member])

    async def claim_webhook_delivery(self, project_id: str, delivery_id: str, *, now_ms: int,
                                     until_ms: int) -> bool:
        # SET NX: one command, atomic; the key expires by itself (and with it, the claim).
        with self._unavailable_on_error():
            return bool(await self._redis.set(f"{PREFIX}whdelivery:{project_id}:{delivery_id}",
                                              "1", nx=True, px=max(until_ms - now_ms, 1)))

    async def get_session_record(self, project_id: str, session_id: str) -> SessionRecord | None:
        with self._unavailable_on_error():
            text = await self._redis.hget(f"{PREFIX}srec:{project_id}", session_id)
        return None if text is None else _session_record(project_id, session_id, _text(text))

    async def take_session_record(self, project_id: str,
                                  session_id: str) -> SessionRecord | None:
        text = await self._call(self._take_session_record,
                                [f"{PREFIX}srec:{project_id}", f"{PREFIX}srec-ends:{project_id}",
                                 _CALL_SESSIONS], [session_id, f"{project_id} {session_id}"])
        return None if not text else _session_record(project_id, session_id, _text(text))

    async def take_ended_calls(self, now_ms: int, limit: int) -> list[SessionRecord]:
        flat = await self._call(self._take_ended_calls, [_CALL_SESSIONS],
                                [PREFIX, now_ms, limit])
        return [_session_record(p, s, text)
                for p, s, text in zip(flat[0::3], flat[1::3], flat[2::3], strict=True)]

    # -- the TURN secret ring ------------------------------------------------------------------

    async def list_turn_secrets(self) -> list[TurnSecretRecord]:
        with self._unavailable_on_error():
            fields = await self._redis.hgetall(_TURN_RING)
        records = []
        for secret_id, text in fields.items():
            data = json.loads(_text(text))
            records.append(TurnSecretRecord(
                secret_id=_text(secret_id), sealed=base64.b64decode(data["sealed"]),
                created_ms=int(data["created_ms"]), retire_at_ms=int(data["retire_at_ms"])))
        return sorted(records, key=lambda r: (-r.created_ms, r.secret_id))

    async def rotate_turn_secret(self, record: TurnSecretRecord, *, now_ms: int,
                                 retire_at_ms: int, min_age_ms: int) -> bool:
        text = json.dumps({"sealed": base64.b64encode(record.sealed).decode(),
                           "created_ms": record.created_ms, "retire_at_ms": 0})
        rotated = await self._call(self._rotate_turn_secret, [_TURN_RING],
                                   [record.secret_id, text, now_ms, retire_at_ms, min_age_ms])
        return bool(rotated)

    async def purge_turn_secrets(self, now_ms: int) -> int:
        return int(await self._call(self._purge_turn_secrets, [_TURN_RING], [now_ms]))


    # -- TURN usage ----------------------------------------------------------------------------

    async def claim_turn_meter(self, state: TurnMeterState, *, now_ms: int) -> TurnMeterState:
        reply = await self._call(
            self._claim_turn_meter, [_TURN_METER],
            [state.owner, now_ms, state.lease_expires_ms, "1" if state.connected else "0",
             state.changed_ms, state.last_event_ms])
        return _meter_state(reply)

    async def turn_meter_state(self) -> TurnMeterState:
        with self._unavailable_on_error():
            reply = await self._redis.hmget(_TURN_METER, "owner", "expires", "connected",
                                            "changed", "last_event")
        return _meter_state(reply)

    async def record_turn_events(self, events: Sequence[TurnAllocationEvent], *, owner: str,
                                 batch: int, now_ms: int, month: str
                                 ) -> dict[str, TurnProjectChange] | None:
        args: list[str | int] = [PREFIX, owner, now_ms, month, QUOTA_TTL_SECONDS,
                                 TURN_TOMBSTONE_MS, batch]
        for event in events:
            args += [event.kind.value, event.allocation, event.project_id, event.user_id,
                     event.relayed_bytes]
        reply = await self._call(self._record_turn_events, [], args)
        return None if reply is None else _project_changes(reply)

    async def sweep_turn_allocations(self, *, owner: str, seen_before_ms: int, now_ms: int,
                                     limit: int
                                     ) -> tuple[int, dict[str, TurnProjectChange]] | None:
        reply = await self._call(self._sweep_turn_allocations, [],
                                 [PREFIX, owner, now_ms, seen_before_ms, limit,
                                  TURN_TOMBSTONE_MS])
        return None if reply is None else (int(reply[0]), _project_changes(reply[1:]))

    async def revoke_turn_subject(self, *, project_id: str, subject: str, until_ms: int,
                                  now_ms: int) -> int:
        until = await self._call(self._revoke_turn_subject,
                                 [f"{PREFIX}turn-revoked:{project_id}"],
                                 [subject, until_ms, now_ms])
        return int(until)

    async def revoked_turn_subjects(self, *, project_id: str, subjects: Sequence[str],
                                    now_ms: int) -> set[str]:
        if not subjects:
            return set()
        with self._unavailable_on_error():
            until = await self._redis.hmget(f"{PREFIX}turn-revoked:{project_id}", list(subjects))
        return {subject for subject, value in zip(subjects, until, strict=True)
                if value is not None and int(value) > now_ms}

    async def lift_turn_subject(self, *, project_id: str, subject: str, now_ms: int) -> bool:
        lifted = await self._call(self._lift_turn_subject,
                                  [f"{PREFIX}turn-revoked:{project_id}"], [subject, now_ms])
        return bool(lifted)

    async def session_turn_username(self, *, project_id: str, session_id: str) -> str | None:
        with self._unavailable_on_error():
            username = await self._redis.hget(_SESSION_TURN_NAMES,
                                              _session_turn_member(project_id, session_id))
        return _text(username) if username else None

    async def take_ended_session_turn(self, *, now_ms: int,
                                      limit: int) -> list[tuple[str, str, str]]:
        flat = await self._call(self._take_ended_session_turn,
                                [_SESSION_TURN_DUE, _SESSION_TURN_NAMES], [now_ms, limit])
        taken = []
        for member, username in zip(flat[0::2], flat[1::2], strict=True):
            project_id, _, session_id = member.partition("/")
            if username:
                taken.append((project_id, session_id, username))
        return taken

    async def turn_usage(self, *, project_id: str, month: str,
                         user_id: str | None = None) -> TurnUsageFigures:
        live, relayed, last = await self._call(self._turn_usage, [],
                                               [PREFIX, project_id, month, user_id or ""])
        return TurnUsageFigures(int(live), int(relayed), int(last))


_TURN_RING = f"{PREFIX}turn-secrets"
_CALL_SESSIONS = f"{PREFIX}call-sessions"


def _session_record(project_id: str, session_id: str, text: str) -> SessionRecord:
    data = json.loads(text)
    return SessionRecord(project_id, session_id, str(data["provider"]), int(data["ends_ms"]),
                         str(data.get("call_id", "")))


_TURN_METER = f"{PREFIX}turn-meter"
_SESSION_TURN_DUE = f"{PREFIX}session-turn-due"
_SESSION_TURN_NAMES = f"{PREFIX}session-turn-names"


def _session_turn_member(project_id: str, session_id: str) -> str:
    return f"{project_id}/{session_id}"
TURN_TOMBSTONE_MS = 3600 * 1000
"""How long an ended allocation's record stays, for the totals coturn sends after its end."""


def _meter_state(reply: Sequence[Any]) -> TurnMeterState:
    owner, expires, connected, changed, last = reply
    return TurnMeterState(owner=owner or "", lease_expires_ms=int(expires or 0),
                          connected=connected == "1", changed_ms=int(changed or 0),
                          last_event_ms=int(last or 0))


def _project_changes(flat: Sequence[Any]) -> dict[str, TurnProjectChange]:
    return {project: TurnProjectChange(int(live), int(relayed))
            for project, live, relayed in zip(flat[0::3], flat[1::3], flat[2::3], strict=True)}

__all__ = ["PREFIX", "RedisStore"]
