"""Lua scripts that move requests atomically. Keys come only through KEYS[], built by gpulb.keys.

A crash (of any process) between two Redis calls must leave every request in exactly one place:
in its ingress, in one micro-batch record, or recorded in its batch's results. Each script below
moves requests between those places in one atomic step.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.commands.core import Script

# Shared Lua: parse an ingress member "BATCH:INDEX:COST:ATTEMPT" -> cost (nil if foreign).
_PARSE_COST = """
local function member_cost(member)
  local cost = string.match(member, '^[%w_]+:%d+:(%d+):%d+$')
  if cost then return tonumber(cost) end
  return nil
end
"""

DISPATCH = (
    _PARSE_COST
    + """
-- Cut one micro-batch from a model's ingress and enqueue it as ONE RQ job on a worker's queue.
-- KEYS[1] ingress zset        KEYS[2] ingress_tokens     KEYS[3] worker load hash
-- KEYS[4] worker credit hash  KEYS[5] worker inflight    KEYS[6] micro-batch hash
-- KEYS[7] rq job hash         KEYS[8] rq queue list      KEYS[9] rq:queues set
-- ARGV[1] micro-batch id (= RQ job id)  ARGV[2] worker id  ARGV[3] model
-- ARGV[4] max requests  ARGV[5] token budget  ARGV[6] max outstanding micro-batches
-- ARGV[7] now (epoch s)  ARGV[8] rq queue key  ARGV[9..] RQ job hash field, value, ...
-- Takes requests from the front while they fit the budget (always at least one).
-- Returns {status, taken, tokens, next_cost, dropped}: status 1 dispatched, 0 ingress empty,
-- -1 worker not accepting (gone, draining or other model), -2 worker has no credit.
local state = redis.call('HGET', KEYS[3], 'state')
if (state ~= 'idle' and state ~= 'busy') or redis.call('HGET', KEYS[3], 'model') ~= ARGV[3] then
  return {-1, 0, 0, -1, 0}
end
if tonumber(redis.call('HGET', KEYS[4], 'batches') or '0') >= tonumber(ARGV[6]) then
  return {-2, 0, 0, -1, 0}
end
local max_count, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local head = redis.call('ZRANGE', KEYS[1], 0, max_count - 1, 'WITHSCORES')
local members, scores, tokens, dropped, scanned = {}, {}, 0, 0, 0
for i = 1, #head, 2 do
  local cost = member_cost(head[i])
  if cost == nil then
    dropped = dropped + 1
  elseif #members > 0 and tokens + cost > budget then
    break
  else
    members[#members + 1] = head[i]
    scores[#scores + 1] = head[i + 1]
    tokens = tokens + cost
  end
  scanned = scanned + 1
end
if scanned > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, scanned - 1)
end
if #members == 0 then
  return {0, 0, 0, -1, dropped}
end
redis.call('DECRBY', KEYS[2], tokens)
redis.call('HSET', KEYS[6], 'worker', ARGV[2], 'model', ARGV[3], 'tokens', tokens,
  'entries', table.concat(members, ' '), 'scores', table.concat(scores, ' '), 'created_at', ARGV[7])
redis.call('SADD', KEYS[5], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'batches', 1)
redis.call('HINCRBY', KEYS[4], 'tokens', tokens)
redis.call('HSET', KEYS[7], unpack(ARGV, 9))
redis.call('RPUSH', KEYS[8], ARGV[1])
redis.call('SADD', KEYS[9], ARGV[8])
local next_cost = -1
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0)
if #nxt > 0 then next_cost = member_cost(nxt[1]) or 0 end
return {1, #members, tokens, next_cost, dropped}
"""
)

RECORD = """
-- Record a finished micro-batch: each result only if none is recorded yet, then settle counters.
-- KEYS[1] micro-batch hash  KEYS[2] worker inflight  KEYS[3] worker credit  KEYS[4] wakeup list
-- KEYS[5+3(b-1)..] for batch b: batch hash, results hash, requests hash
-- ARGV[1] micro-batch id  ARGV[2] now  ARGV[3] wakeup list length to keep
-- ARGV[4..] per batch b: events channel, number started, number of results n,
--           then n times: field, result JSON, '1' if failed else '0'
-- Returns the number of results newly recorded.
local owned = redis.call('HGET', KEYS[1], 'tokens')
if owned then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('HINCRBY', KEYS[3], 'batches', -1)
  redis.call('HINCRBY', KEYS[3], 'tokens', -tonumber(owned))
end
local recorded, pos, b = 0, 4, 0
while pos <= #ARGV do
  local bkey, rkey, qkey = KEYS[5 + 3 * b], KEYS[6 + 3 * b], KEYS[7 + 3 * b]
  local channel, started, n = ARGV[pos], tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2])
  pos = pos + 3
  local completed, failed = 0, 0
  for i = 1, n do
    local field = ARGV[pos]
    if redis.call('HSETNX', rkey, field, ARGV[pos + 1]) == 1 then
      if ARGV[pos + 2] == '1' then failed = failed + 1 else completed = completed + 1 end
      redis.call('HDEL', qkey, field)
    end
    pos = pos + 3
  end
  if owned and started > 0 then redis.call('HINCRBY', bkey, 'running', -started) end
  local done_completed = redis.call('HINCRBY', bkey, 'completed', completed)
  local done_failed = redis.call('HINCRBY', bkey, 'failed', failed)
  local total = tonumber(redis.call('HGET', bkey, 'total') or '0')
  if done_completed + done_failed >= total and redis.call('HGET', bkey, 'state') ~= 'completed' then
    redis.call('HSET', bkey, 'state', 'completed', 'finished_at', ARGV[2], 'running', 0)
    local ttl = tonumber(redis.call('HGET', bkey, 'ttl_s') or '0')
    if ttl > 0 then
      redis.call('EXPIRE', bkey, ttl)
      redis.call('EXPIRE', rkey, ttl)
      redis.call('EXPIRE', qkey, ttl)
    end
  end
  redis.call('PUBLISH', channel, done_completed + done_failed)
  recorded = recorded + completed + failed
  b = b + 1
end
redis.call('RPUSH', KEYS[4], ARGV[1])
redis.call('LTRIM', KEYS[4], -tonumber(ARGV[3]), -1)
return recorded
"""

RELEASE = """
-- Hand a queued (not started) micro-batch back: its requests return to the ingress with their
-- original scores, so they keep their place at the front.
-- KEYS[1] rq queue list  KEYS[2] micro-batch hash  KEYS[3] worker inflight  KEYS[4] worker credit
-- KEYS[5] rq job hash    KEYS[6] ingress zset      KEYS[7] ingress_tokens  KEYS[8] wakeup list
-- ARGV[1] micro-batch id  ARGV[2] wakeup list length to keep
-- Returns the number of requests put back (0 if the micro-batch was no longer queued).
if redis.call('LREM', KEYS[1], 0, ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[5])
local mb = redis.call('HMGET', KEYS[2], 'entries', 'scores', 'tokens')
if not mb[1] then return 0 end
local scores = {}
for s in string.gmatch(mb[2], '%S+') do scores[#scores + 1] = s end
local i = 0
for member in string.gmatch(mb[1], '%S+') do
  i = i + 1
  redis.call('ZADD', KEYS[6], scores[i], member)
end
redis.call('INCRBY', KEYS[7], tonumber(mb[3]))
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'batches', -1)
redis.call('HINCRBY', KEYS[4], 'tokens', -tonumber(mb[3]))
redis.call('RPUSH', KEYS[8], ARGV[1])
redis.call('LTRIM', KEYS[8], -tonumber(ARGV[2]), -1)
return i
"""


class Scripts:
    """The scripts registered on one client (EVALSHA, reloaded by redis-py after a restart)."""

    def __init__(self, conn: redis.Redis) -> None:
        self.dispatch: Script = conn.register_script(DISPATCH)
        self.record: Script = conn.register_script(RECORD)
        self.release: Script = conn.register_script(RELEASE)


def as_ints(reply: Any) -> list[int]:
    return [int(x) for x in reply]
