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
and reconnects (RESP2 keeps that check on). Every connection-level failure becomes
`StoreUnavailableError`.

A paused (or very slow) Redis brings one more hazard: a script the client gave up on sits
in the server's socket buffer and runs when Redis wakes up, counting a call whose caller was
told "unavailable". The counting scripts (`admit`, `begin_session`, `confirm_session`,
`cancel_session`) are therefore fenced: the caller sends a deadline, half the timeout ahead,
expressed on the server's clock (the offset between the clocks is measured from `TIME` at
open and from every reply), and a script that starts after it changes nothing and answers
"late". A late answer is certain to have changed nothing, so that call alone is retried
once at once. The fence uses the real wall clock; the limits themselves use the injected `now_ms`.

Batching. Every credential call runs `admit`. One batch of admissions is in flight at a
time; the admissions that arrive while it is are sent together as the next one, a pipeline
on a connection of their own (one write, then the replies read in order), so batches grow
with the load by themselves and a lone call goes out at once. redis-py
spends far more per command on the pool and the socket than Redis spends on the script
(about 180 us of client CPU for a lone EVALSHA here, 40-50 us each in a pipeline of 10-50).
Each script in the batch is still atomic on its own and fenced by the same deadline; a late
one is retried alone, as above.
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

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
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
    TurnSecretRecord,
    api_key_cursor,
    parse_api_key_cursor,
)

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
# ('1'/'0'), default project id. Returns {clock, outcome, key hash fields | false,
# project JSON | false, TAT | false}.
_ADMIT = _FENCE + """
local prefix, digest, project_id = ARGV[2], ARGV[3], ARGV[4]
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
if ARGV[6] ~= '1' then return {clock, 'admitted', key, project_json, stored} end

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
return {clock, 'admitted', key, project_json, new_tat}
"""

# KEYS: leases, month counter, pending, provider keys. ARGV: deadline, session id, now_ms,
# pending_ms, quota, max_concurrent, provider.
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
return {clock, 'started', active + 1, held + 1, provider_key}
"""

# KEYS: leases, month counter, months set, pending. ARGV: deadline, session id, month,
# now_ms, lease_ms, counter TTL seconds. -> {clock, 'confirmed' | 'lapsed'}.
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
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[6])
return {clock, 'confirmed'}
"""

# KEYS: leases, month counter, pending. ARGV: deadline, session id. A pending lease is
# dropped; a confirmed one (live or expired) is dropped and uncounted.
_CANCEL_SESSION = _FENCE + """
local was_pending = redis.call('ZREM', KEYS[3], ARGV[2]) == 1
if redis.call('ZREM', KEYS[1], ARGV[2]) == 1 and not was_pending then
  if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then redis.call('DECR', KEYS[2]) end
end
return {clock, 'done'}
"""

# KEYS: leases. ARGV: now_ms, new expiry, session id.
_RENEW_SESSION = """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[3])
if not expiry or tonumber(expiry) <= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[3])
return 1
"""

# KEYS: leases. ARGV: now_ms, session id. 1 if a live lease was released.
_END_SESSION = """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not expiry then return 0 end
redis.call('ZREM', KEYS[1], ARGV[2])
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
           prefix .. 'srec-ends:' .. id)
redis.call('SREM', prefix .. 'pkey-projects', id)
for _, month in ipairs(redis.call('SMEMBERS', prefix .. 'quota-months:' .. id)) do
  redis.call('DEL', prefix .. 'quota:' .. id .. ':' .. month)
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
    # The client decodes replies (decode_responses=True); this only narrows the type.
    return value.decode() if isinstance(value, bytes) else value


def _settle(future: asyncio.Future[list[Any]], outcome: list[Any] | BaseException) -> None:
    if future.done():  # its caller was cancelled
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _wall_ms() -> float:
    return time.time() * 1000


class RedisStore:
    """The `Store` on one Redis primary, shared by every replica of the service."""

    def __init__(self, client: aioredis.Redis, *, timeout: float,
                 secrets: Sequence[str] = ()) -> None:
        self._redis = client
        self._secrets = [secret for secret in secrets if secret]
        """Strings never to repeat in an error message (the URL's password)."""
        self._fence_ms = timeout * 1000 / 2
        self._clock_offset_ms = 0.0
        """Redis's wall clock minus ours, in ms (see the fence in the module docstring)."""
        # Admissions waiting for the batch in flight to come back, and that batch.
        self._admits_waiting: list[tuple[list[str | int], asyncio.Future[list[Any]]]] = []
        self._admit_batch: asyncio.Task[None] | None = None
        # The batches' own connection (one batch is in flight at a time), outside the pool:
        # a pool take and give-back per batch cost more than the batch's write and read.
        self._admit_connection: aioredis.Connection = \
            client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        register = client.register_script
        self._admit = register(_ADMIT)
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
        )

    @classmethod
    async def open(cls, url: str, *, timeout: float = 0.1) -> RedisStore:
        """Connects to the Redis at `url` and loads the scripts.

        Args:
            url: `redis://[[user]:password@]host:port/db`, `rediss://...` or
                `unix:///path/to/socket?db=0`.
            timeout: Seconds any one Redis operation (connect, send, read) may take before
                the call fails with `StoreUnavailableError`.

        Raises:
            StoreUnavailableError: Redis cannot be reached now.
        """
        # A blocking pool: more concurrent calls than connections wait for one (up to the
        # store timeout) instead of failing at once with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
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
        client = aioredis.Redis.from_pool(pool)
        parts = urlsplit(url)
        passwords = [parts.password or "", *parse_qs(parts.query).get("password", [])]
        store = cls(client, timeout=timeout,
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
            await client.aclose()
            raise
        return store

    @contextlib.contextmanager
    def _unavailable_on_error(self) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                redis.exceptions.ReadOnlyError, redis.exceptions.TryAgainError,
                redis.exceptions.ClusterDownError, redis.exceptions.OutOfMemoryError,
                OSError, TimeoutError) as error:
            # ConnectionError covers BusyLoadingError (still loading its data set) and
            # AuthenticationError; ReadOnlyError means we talk to a replica after a failover.
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            for secret in self._secrets:
                reason = reason.replace(secret, "***")
            raise StoreUnavailableError(f"Redis store unavailable: {reason}") from None

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
        if self._admit_batch is not None:
            await asyncio.gather(self._admit_batch, return_exceptions=True)
        await self._admit_connection.disconnect()
        await self._redis.aclose()

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
                    count: bool) -> Admission:
        args: list[str | int] = [PREFIX, digest.hex() if digest is not None else "",
                                 project_id, now_ms, "1" if count else "0", DEFAULT_PROJECT_ID]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._admits_waiting.append((args, future))
        if len(self._admits_waiting) == 1 and self._admit_batch is None:
            loop.call_soon(self._send_waiting_admits)
        reply = await future
        reply += [None] * (4 - len(reply))
        outcome, key_fields, project_json, tat = reply
        return Admission(
            outcome=AdmitOutcome(outcome),
            key=_key_from_fields(key_fields) if key_fields else None,
            project=_project_from_json(project_json) if project_json else None,
            tat_ms=int(tat) if tat is not None else None,
        )

    def _send_waiting_admits(self) -> None:
        # One batch in flight at a time: what arrives meanwhile waits for its answer and
        # goes out next, all together, so batches grow with the load by themselves.
        if self._admit_batch is not None or not self._admits_waiting:
            return
        batch, self._admits_waiting = self._admits_waiting, []
        self._admit_batch = asyncio.get_running_loop().create_task(self._send_admits(batch))
        self._admit_batch.add_done_callback(self._admit_batch_done)

    def _admit_batch_done(self, _task: asyncio.Task[None]) -> None:
        self._admit_batch = None
        self._send_waiting_admits()

    async def _send_admits(
            self, batch: list[tuple[list[str | int], asyncio.Future[list[Any]]]]) -> None:
        try:
            await self._send_admit_batch(batch)
        finally:
            # Cancelled with the batch in flight (the store is closing): no caller waits on.
            for _, future in batch:
                _settle(future, StoreUnavailableError("Redis store unavailable: closing"))

    async def _send_admit_batch(
            self, batch: list[tuple[list[str | int], asyncio.Future[list[Any]]]]) -> None:
        sent = _wall_ms()
        deadline = int(sent + self._clock_offset_ms + self._fence_ms)
        connection = self._admit_connection
        try:
            with self._unavailable_on_error():
                try:
                    # As the pool does for its own: (re)connected, and nothing left unread
                    # (a restarted Redis closes it; the check finds that, and reconnects).
                    await self._redis.connection_pool.ensure_connection(connection)
                    # hiredis packs the str and int arguments in C. redis-py's own
                    # pack_commands encodes each one in Python first: 11 % of icegate's
                    # instructions per call on Redis (bench/instructions.py: 828k with
                    # it, 739k without; SQLite 557k).
                    sha = self._admit.sha
                    await connection.send_packed_command(b"".join(
                        # (hiredis's stub types the tuple as one element long.)
                        [hiredis.pack_command(("EVALSHA", sha, 0, deadline, *args))  # type: ignore[arg-type]
                         for args, _ in batch]))
                    replies: list[Any] = []
                    for _ in batch:
                        try:
                            replies.append(await connection.read_response())
                        except redis.exceptions.ResponseError as error:  # NOSCRIPT, say
                            replies.append(error)
                except BaseException:
                    # Mid-batch the stream's position is unknown: start the next one afresh.
                    await connection.disconnect(nowait=True)
                    raise
        except Exception as error:
            for _, future in batch:
                _settle(future, error)
            return
        received = _wall_ms()
        retry = []
        for (args, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, BaseException) or reply[1] == "late":
                # Late (changed nothing), or the script is gone (a restarted Redis): alone,
                # through the path that re-checks the clock and reloads the script.
                retry.append((args, future))
                continue
            self._learn_clock(reply, sent, received, late=False)
            _settle(future, list(reply[1:]))
        for args, future in retry:
            try:
                _settle(future, await self._fenced(self._admit, [], args))
            except Exception as error:
                _settle(future, error)

    async def rate_position(self, project_id: str) -> int | None:
        with self._unavailable_on_error():
            tat = await self._redis.get(f"{PREFIX}rl:{project_id}")
        return int(tat) if tat is not None else None

    # -- sessions ---------------------------------------------------------------------------

    async def begin_session(self, *, project_id: str, session_id: str, month: str,
                            now_ms: int, pending_ms: int, quota: int, max_concurrent: int,
                            provider: str) -> SessionAdmission:
        outcome, active, held, *key = await self._fenced(
            self._begin_session,
            [_leases_key(project_id), _quota_key(project_id, month), _pending_key(project_id),
             _pkey_key(project_id)],
            [session_id, now_ms, pending_ms, quota, max_concurrent, provider])
        record = _provider_from_json(project_id, provider, _text(key[0])) if key else None
        return SessionAdmission(SessionOutcome(outcome), int(active), int(held), record)

    async def confirm_session(self, *, project_id: str, session_id: str, month: str,
                              now_ms: int, lease_ms: int) -> bool:
        [outcome] = await self._fenced(
            self._confirm_session,
            [_leases_key(project_id), _quota_key(project_id, month),
             f"{PREFIX}quota-months:{project_id}", _pending_key(project_id)],
            [session_id, month, now_ms, lease_ms, QUOTA_TTL_SECONDS])
        return bool(outcome == "confirmed")

    async def renew_session(self, *, project_id: str, session_id: str, now_ms: int,
                            lease_ms: int) -> bool:
        renewed = await self._call(self._renew_session, [_leases_key(project_id)],
                                   [now_ms, now_ms + lease_ms, session_id])
        return bool(renewed)

    async def end_session(self, *, project_id: str, session_id: str, now_ms: int) -> bool:
        ended = await self._call(self._end_session, [_leases_key(project_id)],
                                 [now_ms, session_id])
        return bool(ended)

    async def cancel_session(self, *, project_id: str, session_id: str, month: str) -> None:
        await self._fenced(self._cancel_session,
                           [_leases_key(project_id), _quota_key(project_id, month),
                            _pending_key(project_id)],
                           [session_id])

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


_TURN_RING = f"{PREFIX}turn-secrets"
_CALL_SESSIONS = f"{PREFIX}call-sessions"


def _session_record(project_id: str, session_id: str, text: str) -> SessionRecord:
    data = json.loads(text)
    return SessionRecord(project_id, session_id, str(data["provider"]), int(data["ends_ms"]),
                         str(data.get("call_id", "")))

__all__ = ["PREFIX", "RedisStore"]
