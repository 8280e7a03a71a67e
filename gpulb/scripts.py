"""Lua scripts that move requests atomically. Keys come only through KEYS[], built by gpulb.keys.

A crash (of any process) between two Redis calls must leave every request in exactly one place:
in its ingress, in one micro-batch record, or recorded in its batch's results. Each script below
moves requests between those places in one atomic step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from gpulb import keys
from gpulb.errors import GarbageInRedis
from gpulb.models import Result

# Shared Lua: ingress members "BATCH:START:ATTEMPT:AFFINITY:COST,COST,..." (gpulb.keys.ingress_member).
# split_member -> batch, start, attempt, affinity, the costs' text; nil if the member is foreign.
# parse_member -> the same with the costs as a list of numbers.
# Scores are integers below 2**53: '%.17g' writes them back exactly (Lua's own tostring would not).
_MEMBERS = """
-- Indices, attempts and costs are bounded in length: a longer one is not ours, and Lua would turn it into a float
-- ('1.2345678901234e+14') when writing it back.
local function split_member(member)
  local bid, start, attempt, affinity, text = string.match(member, '^(%w+):(%d+):(%d+):(%w*):([%d,]+)$')
  if not bid or #start > 12 or #attempt > 6 or string.find(text, '%d%d%d%d%d%d%d%d%d%d%d') then return nil end
  return bid, tonumber(start), attempt, affinity, text
end

local function parse_member(member)
  local bid, start, attempt, affinity, text = split_member(member)
  if not bid then return nil end
  local costs = {}
  for c in string.gmatch(text, '%d+') do costs[#costs + 1] = tonumber(c) end
  return bid, start, attempt, affinity, costs
end

local function member_of(bid, start, attempt, affinity, costs_text)
  return bid .. ':' .. string.format('%d', start) .. ':' .. attempt .. ':' .. affinity .. ':' .. costs_text
end

local function score_text(score)
  return string.format('%.17g', score)
end

local PRIORITY_SPAN = 17592186044416  -- gpulb.keys.PRIORITY_SPAN (2**44): one priority's band of scores
"""

# Shared Lua: Redis does not roll back a script that fails half-way, so every script checks what it reads
# (types, numbers) before its first write, and either does everything or refuses with nothing written.
# A refusal is an error reply 'GARBAGE <key> <what>' (gpulb.errors.GarbageInRedis on the Python side).
# A model's ingress counters are only sums of what its ingress holds: garbage there is repaired by counting again.
_GUARDS = """
local function is_int(v)
  return type(v) == 'string' and #v <= 15 and string.match(v, '^-?%d+$') ~= nil
end

local function refuse(key, what)
  return redis.error_reply('GARBAGE ' .. key .. ' ' .. what)
end

-- nil if KEY is of type WANT (or missing) and its FIELDS, where set, are integers; else why not.
local function bad_hash(key, fields)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' then return nil end
  if t ~= 'hash' then return 'is a ' .. t .. ', not a hash' end
  if fields and #fields > 0 then
    local values = redis.call('HMGET', key, unpack(fields))
    for i, f in ipairs(fields) do
      if values[i] and not is_int(values[i]) then return 'field ' .. f .. ' is not an integer' end
    end
  end
  return nil
end

local function bad_type(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' or t == want then return nil end
  return 'is a ' .. t .. ', not a ' .. want
end

local function counter_sane(key)
  local t = redis.call('TYPE', key)['ok']
  return t == 'none' or (t == 'string' and is_int(redis.call('GET', key)))
end

-- Count an ingress again (its tokens and its requests) when a counter of it is garbage; true if it did.
local function repair_ingress_counters(zkey, tokens_key, requests_key)
  if counter_sane(tokens_key) and counter_sane(requests_key) then return false end
  local tokens, requests = 0, 0
  for _, member in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do
    local _, _, _, _, text = split_member(member)
    if text then
      for c in string.gmatch(text, '%d+') do tokens = tokens + tonumber(c); requests = requests + 1 end
    end
  end
  redis.call('SET', tokens_key, string.format('%d', tokens))
  redis.call('SET', requests_key, string.format('%d', requests))
  return true
end
"""

DISPATCH = (
    _MEMBERS
    + _GUARDS
    + """
-- Cut one micro-batch from a model's ingress and enqueue it as ONE RQ job on a worker's queue.
-- KEYS[1] ingress zset        KEYS[2] ingress_tokens     KEYS[3] worker load hash
-- KEYS[4] worker credit hash  KEYS[5] worker inflight    KEYS[6] micro-batch hash
-- KEYS[7] rq job hash         KEYS[8] rq queue list      KEYS[9] rq:queues set
-- KEYS[10] affinity owners hash (affinity key -> worker id)  KEYS[11] ingress_requests
-- ARGV[1] micro-batch id (= RQ job id)  ARGV[2] worker id  ARGV[3] model
-- ARGV[4] max requests  ARGV[5] token budget  ARGV[6] max outstanding micro-batches
-- ARGV[7] now (epoch s)  ARGV[8] rq queue key  ARGV[9] '1' to respect affinity owners
-- ARGV[10] members to scan with affinity  ARGV[11] owners whose keys may be taken over (space-separated)
-- ARGV[12] owners-hash TTL (s)  ARGV[13] '1' to count credit in engine slots for a continuous worker (its
-- load hash has slots > 0: it may hold slots + queue_slots requests)  ARGV[14] '1' to take the longest first
-- (the tail of a backlog)  ARGV[15..] RQ job hash field, value, ...
-- Takes requests from the front while they fit the budget (always at least one), splitting the
-- member it stops in: the rest of that run goes back with the score of its first request. With
-- affinity, it skips members whose key another worker owns (unless that owner is listed as free),
-- and records this worker as the owner of the keys it takes. The micro-batch lists one member per
-- request, and their scores as runs 'SCORExCOUNT' (COUNT consecutive scores from SCORE).
-- Idempotent per micro-batch id (a retried call changes nothing and reports status 1 again).
-- Returns {status, taken, tokens, next_cost, dropped, next_affinity, next_owner}: status 1
-- dispatched, 0 ingress empty, -1 worker not accepting (gone, draining, other model), -2 no
-- credit, -3 nothing this worker may take.
if redis.call('EXISTS', KEYS[6]) == 1 or redis.call('EXISTS', KEYS[7]) == 1 then
  -- this micro-batch id was dispatched already: a client retrying a call whose reply it lost
  local done = redis.call('HMGET', KEYS[6], 'count', 'tokens')
  return {1, tonumber(done[1] or '0'), tonumber(done[2] or '0'), 0, 0, '', ''}  -- next head unknown: look again
end
if bad_type(KEYS[3], 'hash') then return {-1, 0, 0, -1, 0, '', ''} end  -- a load key that is not ours: no worker
local load = redis.call('HMGET', KEYS[3], 'state', 'model', 'slots', 'queue_slots')
if (load[1] ~= 'idle' and load[1] ~= 'busy') or load[2] ~= ARGV[3] then
  return {-1, 0, 0, -1, 0, '', ''}
end
for _, check in ipairs({{KEYS[1], 'zset'}, {KEYS[5], 'set'}, {KEYS[8], 'list'}, {KEYS[9], 'set'},
    {KEYS[10], 'hash'}, {KEYS[6], 'hash'}, {KEYS[7], 'hash'}}) do
  local why = bad_type(check[1], check[2])
  if why then return refuse(check[1], why) end
end
local why = bad_hash(KEYS[4], {'batches', 'requests', 'tokens'})
if why then return refuse(KEYS[4], why) end
local credit = redis.call('HMGET', KEYS[4], 'batches', 'requests')
local slots = tonumber(load[3] or '0') or 0
if tonumber(credit[1] or '0') >= tonumber(ARGV[6]) or (ARGV[13] == '1' and slots > 0
    and tonumber(credit[2] or '0') >= slots + (tonumber(load[4] or '0') or 0)) then
  return {-2, 0, 0, -1, 0, '', ''}
end
local me, max_count, budget, affinity_on = ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[9] == '1'
local free, owners = {}, {}
for w in string.gmatch(ARGV[11], '%S+') do free[w] = true end
local function may_take(key)
  if not affinity_on or key == '' then return true end
  if owners[key] == nil then owners[key] = redis.call('HGET', KEYS[10], key) or '' end
  local owner = owners[key]
  return owner == '' or owner == me or free[owner] == true
end
local scan = max_count
if affinity_on or ARGV[14] == '1' then scan = math.max(max_count, tonumber(ARGV[10])) end
repair_ingress_counters(KEYS[1], KEYS[2], KEYS[11])  -- the first write: every read above was checked
local head = redis.call('ZRANGE', KEYS[1], 0, scan - 1, 'WITHSCORES')

-- In order: requests from the front while they fit the budget (at least one), splitting the member it stops in.
local function cut_in_order()
  local members, scores, remove, tokens, dropped, claimed, full = {}, {}, {}, 0, 0, {}, false
  local rest, rest_score = nil, nil
  for i = 1, #head, 2 do
    local bid, start, attempt, key, text = split_member(head[i])
    if bid == nil then
      dropped = dropped + 1
      remove[#remove + 1] = head[i]
    elseif may_take(key) then
      local prefix, suffix, took = bid .. ':', ':' .. attempt .. ':' .. key .. ':', 0
      for at, cost in string.gmatch(text, '()(%d+)') do
        local c = tonumber(cost)
        if #members > 0 and (tokens + c > budget or #members >= max_count) then
          full = true
          if took > 0 then
            rest = prefix .. string.format('%d', start + took) .. suffix .. string.sub(text, at)
            rest_score = score_text(tonumber(head[i + 1]) + took)
          end
          break
        end
        members[#members + 1] = prefix .. string.format('%d', start + took) .. suffix .. cost
        tokens = tokens + c
        took = took + 1
      end
      if took > 0 then
        remove[#remove + 1] = head[i]
        scores[#scores + 1] = head[i + 1] .. 'x' .. took  -- its requests' scores: this one and the next took - 1
        if affinity_on and key ~= '' then owners[key] = me; claimed[#claimed + 1] = key end
      end
      if full then break end
    end
  end
  if #remove > 0 then redis.call('ZREM', KEYS[1], unpack(remove)) end
  if rest then redis.call('ZADD', KEYS[1], rest_score, rest) end
  return members, scores, tokens, dropped, claimed
end

-- The tail of a backlog: among the front requests of the head's priority, the longest first, so that the last
-- request to start is a short one. What a member keeps goes back as runs, each with its first request's score.
local function cut_longest_first()
  local parsed, cands, band = {}, {}, nil
  for i = 1, #head, 2 do
    local bid, start, attempt, key, costs = parse_member(head[i])
    if bid == nil then return nil end  -- a foreign member: the in-order cut drops it
    local b = math.floor(tonumber(head[i + 1]) / PRIORITY_SPAN)
    if band == nil then band = b end
    if b ~= band then break end
    parsed[i] = {bid, start, attempt, key, costs}
    if may_take(key) then
      for k = 1, #costs do
        if #cands < 4096 then cands[#cands + 1] = {costs[k], i, k} end
      end
    end
  end
  table.sort(cands, function(x, y)
    if x[1] ~= y[1] then return x[1] > y[1] end
    if x[2] ~= y[2] then return x[2] < y[2] end
    return x[3] < y[3]
  end)
  local taken, members, scores, tokens, claimed = {}, {}, {}, 0, {}
  for _, c in ipairs(cands) do
    if #members >= max_count then break end
    if #members == 0 or tokens + c[1] <= budget then
      local i, k = c[2], c[3]
      local p = parsed[i]
      taken[i] = taken[i] or {}
      taken[i][k] = true
      members[#members + 1] = member_of(p[1], p[2] + k - 1, p[3], p[4], c[1])
      scores[#scores + 1] = score_text(tonumber(head[i + 1]) + k - 1) .. 'x1'
      tokens = tokens + c[1]
      if affinity_on and p[4] ~= '' then owners[p[4]] = me; claimed[#claimed + 1] = p[4] end
    end
  end
  for i, ks in pairs(taken) do
    local p = parsed[i]
    redis.call('ZREM', KEYS[1], head[i])
    local from = nil
    for k = 1, #p[5] + 1 do
      if k <= #p[5] and not ks[k] then
        from = from or k
      elseif from ~= nil then
        local kept = {}
        for j = from, k - 1 do kept[#kept + 1] = p[5][j] end
        redis.call('ZADD', KEYS[1], score_text(tonumber(head[i + 1]) + from - 1),
          member_of(p[1], p[2] + from - 1, p[3], p[4], table.concat(kept, ',')))
        from = nil
      end
    end
  end
  return members, scores, tokens, 0, claimed
end

local members, scores, tokens, dropped, claimed
if ARGV[14] == '1' then members, scores, tokens, dropped, claimed = cut_longest_first() end
if members == nil then members, scores, tokens, dropped, claimed = cut_in_order() end
if #members == 0 then
  local status = 0
  if redis.call('ZCARD', KEYS[1]) > 0 then status = -3 end
  return {status, 0, 0, -1, dropped, '', ''}
end
for _, key in ipairs(claimed) do redis.call('HSET', KEYS[10], key, me) end
if #claimed > 0 then redis.call('EXPIRE', KEYS[10], tonumber(ARGV[12])) end
redis.call('DECRBY', KEYS[2], tokens)
redis.call('DECRBY', KEYS[11], #members)
redis.call('HSET', KEYS[6], 'worker', me, 'model', ARGV[3], 'tokens', tokens, 'count', #members,
  'entries', table.concat(members, ' '), 'scores', table.concat(scores, ' '), 'created_at', ARGV[7])
redis.call('SADD', KEYS[5], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'batches', 1)
redis.call('HINCRBY', KEYS[4], 'tokens', tokens)
redis.call('HINCRBY', KEYS[4], 'requests', #members)
redis.call('HSET', KEYS[7], unpack(ARGV, 15))
redis.call('RPUSH', KEYS[8], ARGV[1])
redis.call('SADD', KEYS[9], ARGV[8])
local next_cost, next_key, next_owner = -1, '', ''
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0)
if #nxt > 0 then
  local bid, _, _, key, costs = parse_member(nxt[1])
  next_cost, next_key = 0, ''
  if bid then next_cost, next_key = costs[1], key end
  if affinity_on and next_key ~= '' then next_owner = redis.call('HGET', KEYS[10], next_key) or '' end
end
return {1, #members, tokens, next_cost, dropped, next_key, next_owner}
"""
)

# Shared Lua: after results were added to a batch, mark it completed (and set its expiry) when
# every request has one, and tell waiting producers. Returns completed + failed.
_SETTLE_BATCH = """
-- A request's custom_id (the caller's own name for it), read from its payload before the payload goes.
local function custom_id_of(qkey, idx)
  local raw = redis.call('HGET', qkey, idx)
  if not raw then return nil end
  local ok, payload = pcall(cjson.decode, raw)
  if ok and type(payload) == 'table' and type(payload['custom_id']) == 'string' then return payload['custom_id'] end
  return nil
end

local BATCH_FIELDS = {'total', 'running', 'completed', 'failed', 'cancelled', 'ttl_s'}

-- What a script may write of a batch, checked before its first write: 'ok' all of it; 'gone' nothing (its record
-- expired or was deleted: nobody waits); 'results' its results and payloads, not its record, which holds garbage;
-- 'garbage' nothing (its results or payloads are not hashes).
local function batch_condition(bkey, rkey, qkey)
  if bad_type(rkey, 'hash') or bad_type(qkey, 'hash') then return 'garbage' end
  local t = redis.call('TYPE', bkey)['ok']
  if t == 'none' then return 'gone' end
  if t ~= 'hash' then return 'garbage' end
  if bad_hash(bkey, BATCH_FIELDS) then return 'results' end
  return 'ok'
end

local function settle_batch(bkey, rkey, qkey, channel, now, completed, failed, cancelled)
  local done = redis.call('HINCRBY', bkey, 'completed', completed)
    + redis.call('HINCRBY', bkey, 'failed', failed)
    + redis.call('HINCRBY', bkey, 'cancelled', cancelled)
  local total = tonumber(redis.call('HGET', bkey, 'total') or '0')
  local state = redis.call('HGET', bkey, 'state')
  if done >= total and state ~= 'completed' and state ~= 'cancelled' then
    local final = 'completed'
    if tonumber(redis.call('HGET', bkey, 'cancelled')) > 0 then final = 'cancelled' end
    redis.call('HSET', bkey, 'state', final, 'finished_at', now, 'running', 0)
    local ttl = tonumber(redis.call('HGET', bkey, 'ttl_s') or '0')
    if ttl > 0 then
      redis.call('EXPIRE', bkey, ttl)
      redis.call('EXPIRE', rkey, ttl)
      redis.call('EXPIRE', qkey, ttl)
    end
  end
  redis.call('PUBLISH', channel, done)
  return done
end

local function release_credit(mbkey, inflight, credit, mb_id, wakeup, keep, worker_id)
  local mb = redis.call('HMGET', mbkey, 'tokens', 'count')
  redis.call('DEL', mbkey)
  redis.call('SREM', inflight, mb_id)
  redis.call('HINCRBY', credit, 'batches', -1)
  redis.call('HINCRBY', credit, 'tokens', 0 - tonumber(mb[1]))
  redis.call('HINCRBY', credit, 'requests', 0 - tonumber(mb[2] or '0'))
  redis.call('RPUSH', wakeup, 'w:' .. worker_id)  -- keys.wake_worker_token
  redis.call('LTRIM', wakeup, -tonumber(keep), -1)
end
"""

START = (
    _MEMBERS
    + _GUARDS
    + _SETTLE_BATCH
    + """
-- A worker hands a micro-batch's requests to its backend: from now on a crash costs each an attempt.
-- KEYS[1] micro-batch hash  KEYS[2+3(b-1)..] for batch b: batch hash, requests hash, results hash
-- ARGV per batch b: n, then n times: request field, its ingress member
-- Reads each request's payload (unless its result is recorded) and its batch's submitted_at and
-- cancelled_at; a request runs if it has a payload, no result and its batch is not cancelled.
-- Records the members that run in the micro-batch ('ran') and counts them as running, once (a
-- retried call changes nothing and reports the members recorded the first time). A batch whose keys hold
-- garbage runs nothing (its results could not be recorded), or runs without counts if only its record does.
-- Returns nil if the micro-batch was taken back meanwhile: do not run it. Otherwise per batch:
-- submitted_at, cancelled ('1' or ''), then per request: done ('1' or ''), runs ('1' or ''), payload.
if redis.call('EXISTS', KEYS[1]) == 0 or bad_type(KEYS[1], 'hash') then return false end
local conditions, pos, b = {}, 1, 0
while pos <= #ARGV do
  conditions[b] = batch_condition(KEYS[2 + 3 * b], KEYS[4 + 3 * b], KEYS[3 + 3 * b])
  pos, b = pos + 1 + 2 * tonumber(ARGV[pos]), b + 1
end
local before = redis.call('HGET', KEYS[1], 'ran')
local known = {}
for m in string.gmatch(before or '', '%S+') do known[m] = true end
local out, ran = {}, {}
pos, b = 1, 0
while pos <= #ARGV do
  local bkey, qkey, rkey, condition = KEYS[2 + 3 * b], KEYS[3 + 3 * b], KEYS[4 + 3 * b], conditions[b]
  local meta = {false, false}
  if condition == 'ok' or condition == 'results' then
    meta = redis.call('HMGET', bkey, 'submitted_at', 'cancelled_at')
  end
  local readable = condition ~= 'garbage'
  local cancelled = meta[2] ~= false
  out[#out + 1] = meta[1] or '0'
  out[#out + 1] = cancelled and '1' or ''
  local n, started = tonumber(ARGV[pos]), 0
  pos = pos + 1
  for i = 1, n do
    local field, member = ARGV[pos], ARGV[pos + 1]
    pos = pos + 2
    local done = readable and redis.call('HEXISTS', rkey, field) == 1
    local payload = false
    if readable and not done then payload = redis.call('HGET', qkey, field) end
    local runs = known[member] == true
    if not before then runs = not done and not cancelled and payload ~= false and condition ~= 'gone' end
    if runs then ran[#ran + 1] = member; started = started + 1 end
    out[#out + 1] = done and '1' or ''
    out[#out + 1] = runs and '1' or ''
    out[#out + 1] = payload
  end
  if not before and started > 0 and condition == 'ok' then
    redis.call('HINCRBY', bkey, 'running', started)
    if redis.call('HGET', bkey, 'state') == 'pending' then redis.call('HSET', bkey, 'state', 'running') end
  end
  b = b + 1
end
if not before then redis.call('HSET', KEYS[1], 'ran', table.concat(ran, ' ')) end
return out
"""
)

RECORD = (
    _MEMBERS
    + _GUARDS
    + _SETTLE_BATCH
    + """
-- Record finished requests of a micro-batch, each result only if none is recorded yet, and settle
-- counters. A continuous worker records requests as each finishes (several calls per micro-batch);
-- the call with final '1' (after every request has a result) releases what the micro-batch still holds.
-- KEYS[1] micro-batch hash  KEYS[2] worker inflight  KEYS[3] worker credit  KEYS[4] wakeup list
-- KEYS[5] the model's output-length stats hash
-- KEYS[6+3(b-1)..] for batch b: batch hash, results hash, requests hash
-- ARGV[1] micro-batch id  ARGV[2] now  ARGV[3] wakeup list length to keep  ARGV[4] worker id
-- ARGV[5] '1' if final  ARGV[6] output tokens of requests that stopped by themselves  ARGV[7] their number
-- ARGV[8] wake the balancer only once the worker holds at most this many requests ('' : always)
-- ARGV[9..] per batch b: events channel, number of results n,
--           then n times: field, ingress member, result JSON, outcome ('0' completed, '1' failed, '2' cancelled),
--           cost, '1' if it was counted as running
-- Each request is settled once per micro-batch (a mark '=MEMBER' in the micro-batch hash, so a retried
-- call changes nothing twice): its credit (cost, one request) is given back and, if it was running, the
-- batch's running count drops. A micro-batch that was taken back meanwhile (its worker looked dead)
-- still records results that are not recorded yet, but no longer touches credit or running counts.
-- Returns {results newly recorded, batches or keys left alone because they held garbage}.
local garbage = 0
local owned = redis.call('EXISTS', KEYS[1]) == 1
if owned and (bad_hash(KEYS[1], {'tokens', 'count'}) or bad_hash(KEYS[3], {'batches', 'tokens', 'requests'})
    or bad_type(KEYS[2], 'set')) then
  owned, garbage = false, garbage + 1  -- the credit of this micro-batch is garbage: record, touch no credit
end
local wakeable = bad_type(KEYS[4], 'list') == nil
local learn = tonumber(ARGV[7]) > 0 and bad_hash(KEYS[5], {'count', 'tokens'}) == nil
local conditions, pos, b = {}, 9, 0
while pos <= #ARGV do
  conditions[b] = batch_condition(KEYS[6 + 3 * b], KEYS[7 + 3 * b], KEYS[8 + 3 * b])
  if conditions[b] == 'results' or conditions[b] == 'garbage' then garbage = garbage + 1 end
  pos, b = pos + 2 + 6 * tonumber(ARGV[pos + 1]), b + 1
end
if not wakeable then garbage = garbage + 1 end
-- every read is checked: from here on nothing fails
local recorded, freed_tokens, freed, wake = 0, 0, 0, true
pos, b = 9, 0
while pos <= #ARGV do
  local bkey, rkey, qkey = KEYS[6 + 3 * b], KEYS[7 + 3 * b], KEYS[8 + 3 * b]
  local channel, n, condition = ARGV[pos], tonumber(ARGV[pos + 1]), conditions[b]
  pos = pos + 2
  local counts, running = {['0'] = 0, ['1'] = 0, ['2'] = 0}, 0
  for i = 1, n do
    local field, member, outcome = ARGV[pos], ARGV[pos + 1], ARGV[pos + 3]
    if (condition == 'ok' or condition == 'results') and redis.call('HSETNX', rkey, field, ARGV[pos + 2]) == 1 then
      counts[outcome] = counts[outcome] + 1
      redis.call('HDEL', qkey, field)
    end
    if owned and redis.call('HSETNX', KEYS[1], '=' .. member, 1) == 1 then
      freed_tokens = freed_tokens + tonumber(ARGV[pos + 4])
      freed = freed + 1
      if ARGV[pos + 5] == '1' then running = running + 1 end
    end
    pos = pos + 6
  end
  if condition == 'ok' then
    if running > 0 then redis.call('HINCRBY', bkey, 'running', -running) end
    settle_batch(bkey, rkey, qkey, channel, ARGV[2], counts['0'], counts['1'], counts['2'])
  end
  recorded = recorded + counts['0'] + counts['1'] + counts['2']
  b = b + 1
end
if learn then
  local seen = redis.call('HINCRBY', KEYS[5], 'count', ARGV[7])
  local total = redis.call('HINCRBY', KEYS[5], 'tokens', ARGV[6])
  if seen > 20000 then  -- forget slowly: halve both, so the mean follows a model whose outputs change
    redis.call('HSET', KEYS[5], 'count', math.floor(seen / 2), 'tokens', math.floor(total / 2))
  end
end
if not wakeable then redis.call('DEL', KEYS[4]) end  -- wake-up tokens only say 'look again': a fresh list is safe
if owned then
  if ARGV[5] == '1' then
    release_credit(KEYS[1], KEYS[2], KEYS[3], ARGV[1], KEYS[4], ARGV[3], ARGV[4])
  else
    redis.call('HINCRBY', KEYS[1], 'tokens', -freed_tokens)
    redis.call('HINCRBY', KEYS[1], 'count', -freed)
    redis.call('HINCRBY', KEYS[3], 'tokens', -freed_tokens)
    local held = redis.call('HINCRBY', KEYS[3], 'requests', -freed)
    wake = ARGV[8] == '' or held <= tonumber(ARGV[8])  -- no round trip of the balancer for a slot or two
  end
end
if wake and (not owned or ARGV[5] ~= '1') then
  redis.call('RPUSH', KEYS[4], 'w:' .. ARGV[4])
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[3]), -1)
end
return {recorded, garbage}
"""
)

REQUEUE = (
    _MEMBERS
    + _GUARDS
    + _SETTLE_BATCH
    + """
-- Take a micro-batch back from a worker and put its unfinished requests at the front of the
-- ingress (their original scores). Mode 'release': only if still queued (a draining worker hands
-- back what it has not started). Mode 'recover': whatever its state (its worker is dead).
-- A request that had started running (START) counts one more attempt; at max_attempts it is
-- recorded as failed with the reason instead (dead letter). Recorded requests are not re-run.
-- KEYS[1] micro-batch hash  KEYS[2] worker inflight  KEYS[3] worker credit  KEYS[4] rq queue list
-- KEYS[5] rq job hash  KEYS[6] ingress zset  KEYS[7] ingress_tokens  KEYS[8] wakeup list
-- KEYS[9] ingress_requests  KEYS[10+3(b-1)..] for batch b: batch hash, results hash, requests hash
-- ARGV[1] micro-batch id  ARGV[2] mode  ARGV[3] now  ARGV[4] max attempts  ARGV[5] wakeup keep
-- ARGV[6] worker id  ARGV[7] reason  ARGV[8..] per batch b: batch id, events channel
-- Returns {requeued, dead_lettered, was_queued}.
local why = bad_type(KEYS[1], 'hash') or bad_type(KEYS[6], 'zset')
if why then return refuse(KEYS[1] .. ' or ' .. KEYS[6], why) end
local mb = redis.call('HMGET', KEYS[1], 'entries', 'scores', 'tokens', 'ran')
if not mb[1] then return {0, 0, 0} end
local queue_ok = bad_type(KEYS[4], 'list') == nil
local queued = 0
if queue_ok then queued = redis.call('LREM', KEYS[4], 0, ARGV[1]) end  -- LREM of an absent id writes nothing
if ARGV[2] == 'release' and queued == 0 then return {0, 0, 0} end
-- every read below is checked before the first write that can fail
local credit_ok = bad_hash(KEYS[1], {'tokens', 'count'}) == nil and bad_type(KEYS[2], 'set') == nil
  and bad_hash(KEYS[3], {'batches', 'tokens', 'requests'}) == nil
local slot, conditions = {}, {}
for b = 0, (#ARGV - 9) / 2 do
  slot[ARGV[8 + 2 * b]] = b
  conditions[b] = batch_condition(KEYS[10 + 3 * b], KEYS[11 + 3 * b], KEYS[12 + 3 * b])
end
local scores = {}
for first, count in string.gmatch(mb[2] or '', '(%S+)x(%d+)') do
  for k = 0, tonumber(count) - 1 do scores[#scores + 1] = score_text((tonumber(first) or 0) + k) end
end
if bad_type(KEYS[8], 'list') then redis.call('DEL', KEYS[8]) end  -- wake-up tokens only say 'look again'
repair_ingress_counters(KEYS[6], KEYS[7], KEYS[9])
if queued > 0 then redis.call('DEL', KEYS[5]) end
local ran = {}
for m in string.gmatch(mb[4] or '', '%S+') do ran[m] = true end
local now, max_attempts = ARGV[3], tonumber(ARGV[4])
local running, dead, tokens, requeued, i = {}, {}, 0, 0, 0
for member in string.gmatch(mb[1], '%S+') do
  i = i + 1
  local bid, idx, attempt, affinity, costs = parse_member(member)  -- one request
  local b = bid and slot[bid]
  -- dropped: a member that is not ours, or of a batch that is gone or whose results could never be recorded
  local condition = b and conditions[b] or 'gone'
  if (condition == 'ok' or condition == 'results') and redis.call('HEXISTS', KEYS[11 + 3 * b], idx) == 0 then
    local rkey, qkey = KEYS[11 + 3 * b], KEYS[12 + 3 * b]
    local next_attempt = tonumber(attempt)
    if ran[member] then
      next_attempt = next_attempt + 1
      running[b] = (running[b] or 0) + 1
    end
    if next_attempt >= max_attempts then
      local submitted = tonumber(redis.call('HGET', KEYS[10 + 3 * b], 'submitted_at') or now) or tonumber(now)
      redis.call('HSET', rkey, idx, cjson.encode({request_id = bid .. '-' .. idx, index = idx,
        text = '', output_tokens = 0, worker = ARGV[6], error = ARGV[7], attempts = next_attempt,
        submitted_at = submitted, started_at = tonumber(now), finished_at = tonumber(now),
        custom_id = custom_id_of(qkey, idx)}))
      redis.call('HDEL', qkey, idx)
      dead[b] = (dead[b] or 0) + 1
    else
      redis.call('ZADD', KEYS[6], scores[i] or score_text(0), member_of(bid, idx, next_attempt, affinity, costs[1]))
      tokens = tokens + costs[1]
      requeued = requeued + 1
    end
  end
end
local dead_total = 0
for b = 0, (#ARGV - 9) / 2 do
  local bkey = KEYS[10 + 3 * b]
  if conditions[b] == 'ok' then
    if running[b] then redis.call('HINCRBY', bkey, 'running', -running[b]) end
    if dead[b] then settle_batch(bkey, KEYS[11 + 3 * b], KEYS[12 + 3 * b], ARGV[9 + 2 * b], now, 0, dead[b], 0) end
  end
  dead_total = dead_total + (dead[b] or 0)
end
redis.call('INCRBY', KEYS[7], tokens)
redis.call('INCRBY', KEYS[9], requeued)
if credit_ok then
  release_credit(KEYS[1], KEYS[2], KEYS[3], ARGV[1], KEYS[8], ARGV[5], ARGV[6])
else  -- a micro-batch record or credit that is not ours: forget it, the balancer refuses garbage credit
  redis.call('DEL', KEYS[1])
  if bad_type(KEYS[2], 'set') == nil then redis.call('SREM', KEYS[2], ARGV[1]) end
end
return {requeued, dead_total, queued}
"""
)


CANCEL = (
    _MEMBERS
    + _GUARDS
    + _SETTLE_BATCH
    + """
-- Cancel what of a batch still waits in the ingress: remove it and record it as cancelled.
-- (Requests already in a worker's queue are cancelled by that worker when it reaches them.)
-- KEYS[1] ingress zset  KEYS[2] ingress_tokens  KEYS[3] batch hash  KEYS[4] results hash
-- KEYS[5] requests hash  KEYS[6] ingress_requests
-- ARGV[1] now  ARGV[2] events channel  ARGV[3..] per ingress member: the member, then the cancelled
-- result JSON of each of its requests in order
-- Returns the number of requests cancelled here.
local why = bad_type(KEYS[1], 'zset')
if why then return refuse(KEYS[1], why) end
if batch_condition(KEYS[3], KEYS[4], KEYS[5]) ~= 'ok' then return refuse(KEYS[3], 'is not a batch gpulb wrote') end
repair_ingress_counters(KEYS[1], KEYS[2], KEYS[6])
if not redis.call('HGET', KEYS[3], 'cancelled_at') then redis.call('HSET', KEYS[3], 'cancelled_at', ARGV[1]) end
local n, removed, tokens, pos = 0, 0, 0, 3
while pos <= #ARGV do
  local _, start, _, _, costs = parse_member(ARGV[pos])
  if redis.call('ZREM', KEYS[1], ARGV[pos]) == 1 then
    for k = 1, #costs do
      local field = string.format('%d', start + k - 1)
      local result = cjson.decode(ARGV[pos + k])
      result['custom_id'] = custom_id_of(KEYS[5], field)
      if redis.call('HSETNX', KEYS[4], field, cjson.encode(result)) == 1 then n = n + 1 end
      redis.call('HDEL', KEYS[5], field)
      tokens = tokens + costs[k]
    end
    removed = removed + #costs
  end
  pos = pos + 1 + #costs
end
redis.call('DECRBY', KEYS[2], tokens)
redis.call('DECRBY', KEYS[6], removed)
settle_batch(KEYS[3], KEYS[4], KEYS[5], ARGV[2], ARGV[1], 0, 0, n)
return n
"""
)


PUBLISH = (
    _MEMBERS
    + _GUARDS
    + """
-- Make a staged batch visible: its record, its ingress members and counters, a wake-up, all or nothing.
-- KEYS[1] requests hash (staged payloads)  KEYS[2] batch hash  KEYS[3] batch index zset  KEYS[4] ingress zset
-- KEYS[5] ingress_tokens  KEYS[6] ingress_requests  KEYS[7] models set  KEYS[8] wakeup list
-- ARGV[1] '1' to list the batch  ARGV[2] how many batches the index keeps  ARGV[3] batch id
-- ARGV[4] submitted_at  ARGV[5] tokens  ARGV[6] requests  ARGV[7] model  ARGV[8] wake-up token
-- ARGV[9] wake-up list length to keep  ARGV[10] R  ARGV[11..10+2R] batch record field, value, ...
-- ARGV[11+2R..] ingress score, member, ...
-- Returns 1 when published, 0 when it was already (a retry whose first reply was lost).
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local why = bad_type(KEYS[1], 'hash')
if why then return refuse(KEYS[1], why) end
if redis.call('EXISTS', KEYS[1]) == 0 then return refuse(KEYS[1], 'is gone: the staged requests expired') end
for _, check in ipairs({{KEYS[3], 'zset'}, {KEYS[4], 'zset'}, {KEYS[7], 'set'}}) do
  why = bad_type(check[1], check[2])
  if why then return refuse(check[1], why) end
end
-- every read is checked: from here on nothing fails
if bad_type(KEYS[8], 'list') then redis.call('DEL', KEYS[8]) end  -- wake-up tokens only say 'look again'
repair_ingress_counters(KEYS[4], KEYS[5], KEYS[6])
redis.call('PERSIST', KEYS[1])
local r = tonumber(ARGV[10])
redis.call('HSET', KEYS[2], unpack(ARGV, 11, 10 + 2 * r))
if ARGV[1] == '1' then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -tonumber(ARGV[2]) - 1)
end
local first = 11 + 2 * r
while first <= #ARGV do  -- in slices: unpack has a limit of a few thousand values
  local last = math.min(#ARGV, first + 3999)
  redis.call('ZADD', KEYS[4], unpack(ARGV, first, last))
  first = last + 1
end
redis.call('INCRBY', KEYS[5], ARGV[5])
redis.call('INCRBY', KEYS[6], ARGV[6])
redis.call('SADD', KEYS[7], ARGV[7])
redis.call('RPUSH', KEYS[8], ARGV[8])
redis.call('LTRIM', KEYS[8], -tonumber(ARGV[9]), -1)
return 1
"""
)


# -- the typed facade: one method per script; KEYS and ARGV are built here and nowhere else --------------------------

Arg = str | int | float | bytes
R = TypeVar("R")


@dataclass(slots=True)
class ScriptCall(Generic[R]):
    """One call of a script: its KEYS, its ARGV and how to read its reply. ``reran`` is set when a pipelined call met
    NOSCRIPT and ran again, loaded, outside its pipeline."""

    script: Script
    keys: list[str]
    args: list[Arg]
    parse: Callable[[Any], R]
    reran: bool = False


class DispatchReply(NamedTuple):
    """status 1 dispatched, 0 ingress empty, -1 worker not accepting, -2 no credit, -3 nothing this worker may take;
    then the requests and tokens taken, the next head's cost (-1: empty), foreign members dropped, and the next
    head's affinity key and its owner."""

    status: int
    taken: int
    tokens: int
    next_cost: int
    dropped: int
    next_affinity: str
    next_owner: str


@dataclass(frozen=True, slots=True)
class StartRequest:
    index: int
    member: str  # its ingress member as the micro-batch lists it (one request)


class StartedRequest(NamedTuple):
    done: bool  # its result was recorded already
    runs: bool  # counted as running: hand it to the backend
    payload: str | None


class StartedBatch(NamedTuple):
    submitted_at: float
    cancelled: bool
    requests: list[StartedRequest]


StartReply = list[StartedBatch] | None  # None: the micro-batch was taken back meanwhile, do not run it


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    index: int
    member: str
    result: Result
    cost: int
    started: bool  # counted as running by START


class RecordReply(NamedTuple):
    recorded: int  # results newly recorded
    garbage: int  # batches or keys left alone because they held garbage


class RequeueReply(NamedTuple):
    requeued: int
    dead_lettered: int
    was_queued: bool  # still in its RQ queue (never started)


class CancelledRun(NamedTuple):
    member: str  # an ingress member of the batch
    results: list[Result]  # the cancelled result of each of its requests, in order


def outcome_flag(result: Result) -> str:
    """How the record script counts a result: '0' completed, '1' failed, '2' cancelled."""
    if result.cancelled:
        return "2"
    return "1" if result.error else "0"


class Scripts:
    """The scripts registered on one client (EVALSHA, reloaded by redis-py after a restart), one method each.

    A method raises :class:`GarbageInRedis` when its script refused (it wrote nothing then)."""

    def __init__(self, conn: redis.Redis) -> None:
        self._dispatch = conn.register_script(DISPATCH)
        self._start = conn.register_script(START)
        self._record = conn.register_script(RECORD)
        self._requeue = conn.register_script(REQUEUE)
        self._cancel = conn.register_script(CANCEL)
        self._publish = conn.register_script(PUBLISH)

    # -- calls in a pipeline ------------------------------------------------------------------------------------------

    def queue_loads(self, pipe: redis.client.Pipeline) -> None:
        """Load the scripts sent as bare EVALSHA inside pipelines (START, RECORD), on ``pipe``."""
        for script in (self._start, self._record):
            pipe.script_load(script.script)

    def queue(self, pipe: redis.client.Pipeline, call: ScriptCall[R]) -> ScriptCall[R]:
        """Add ``call`` to ``pipe`` as EVALSHA itself (a Script object in a pipeline costs a SCRIPT EXISTS round trip
        every time); read its reply with :meth:`reply`."""
        pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        return call

    def reply(self, call: ScriptCall[R], raw: Any) -> R:
        """The reply of a pipelined ``call`` (``raw``: what the pipeline returned for it, errors not raised)."""
        if isinstance(raw, NoScriptError):  # Redis restarted and lost its scripts: run it again, loaded
            call.reran = True
            return self.run(call)
        if isinstance(raw, redis.ResponseError):
            raise garbage_refusal(raw) or raw
        if isinstance(raw, Exception):
            raise raw
        return call.parse(raw)

    def run(self, call: ScriptCall[R]) -> R:
        """Run ``call`` now (EVALSHA, loading the script if Redis lacks it)."""
        try:
            raw = call.script(keys=call.keys, args=call.args)
        except redis.ResponseError as exc:
            if (refusal := garbage_refusal(exc)) is None:
                raise
            raise refusal from exc
        return call.parse(raw)

    # -- one method per script ----------------------------------------------------------------------------------------

    def dispatch(
        self, *, microbatch_id: str, worker_id: str, model: str, max_requests: int, token_budget: int,
        max_outstanding: int, now: float, respect_affinity: bool, affinity_scan: int, free_owners: Sequence[str],
        owners_ttl_s: int, credit_in_slots: bool, longest_first: bool, rq_job_fields: Sequence[str | bytes],
    ) -> DispatchReply:  # fmt: skip
        """Cut one micro-batch from ``model``'s ingress and enqueue it as one RQ job on ``worker_id``'s queue."""
        script_keys = [
            keys.ingress_key(model), keys.ingress_tokens_key(model), keys.load_key(worker_id),
            keys.credit_key(worker_id), keys.inflight_key(worker_id), keys.microbatch_key(microbatch_id),
            keys.rq_job_key(microbatch_id), keys.rq_queue_key(worker_id), keys.rq_queues_key(),
            keys.affinity_key(model), keys.ingress_requests_key(model),
        ]  # fmt: skip
        args: list[Arg] = [
            microbatch_id, worker_id, model, max_requests, token_budget, max_outstanding, now,
            keys.rq_queue_key(worker_id), _flag(respect_affinity), affinity_scan, " ".join(free_owners),
            owners_ttl_s, _flag(credit_in_slots), _flag(longest_first), *rq_job_fields,
        ]  # fmt: skip
        return self.run(ScriptCall(self._dispatch, script_keys, args, _dispatch_reply))

    def start_call(
        self, *, microbatch_id: str, batches: Mapping[str, Sequence[StartRequest]]
    ) -> ScriptCall[StartReply]:
        """START: hand a micro-batch's requests (per batch id, in order) to the backend; see :meth:`start`."""
        script_keys, args = [keys.microbatch_key(microbatch_id)], list[Arg]()
        for batch_id, requests in batches.items():
            script_keys += [
                keys.batch_key(batch_id),
                keys.batch_requests_key(batch_id),
                keys.batch_results_key(batch_id),
            ]
            args.append(len(requests))
            for request in requests:
                args += [str(request.index), request.member]
        sizes = [len(requests) for requests in batches.values()]
        return ScriptCall(self._start, script_keys, args, functools.partial(_start_reply, sizes))

    def start(self, *, microbatch_id: str, batches: Mapping[str, Sequence[StartRequest]]) -> StartReply:
        """Read the requests' payloads and count those that run as running; per batch in ``batches``' order."""
        return self.run(self.start_call(microbatch_id=microbatch_id, batches=batches))

    def record_call(
        self, *, microbatch_id: str, worker_id: str, model: str, now: float, final: bool, wake_at: int | None,
        batches: Mapping[str, Sequence[RecordedRequest]],
    ) -> ScriptCall[RecordReply]:  # fmt: skip
        """RECORD: these results of a micro-batch (per batch id); ``final`` when they are its last; ``wake_at``: wake
        the balancer only once the worker holds at most that many requests (None: always)."""
        stopped = [r.result.output_tokens for rs in batches.values() for r in rs if r.result.finish_reason == "stop"]
        script_keys = [
            keys.microbatch_key(microbatch_id), keys.inflight_key(worker_id), keys.credit_key(worker_id),
            keys.wakeup_key(), keys.output_lengths_key(model),
        ]  # fmt: skip
        args: list[Arg] = [microbatch_id, now, keys.WAKEUP_KEEP, worker_id, _flag(final), sum(stopped), len(stopped),
                           "" if wake_at is None else wake_at]  # fmt: skip
        for batch_id, requests in batches.items():
            script_keys += [
                keys.batch_key(batch_id),
                keys.batch_results_key(batch_id),
                keys.batch_requests_key(batch_id),
            ]
            args += [keys.batch_events_channel(batch_id), len(requests)]
            for r in requests:
                args += [str(r.index), r.member, r.result.model_dump_json(), outcome_flag(r.result), r.cost,
                         _flag(r.started)]  # fmt: skip
        return ScriptCall(self._record, script_keys, args, _record_reply)

    def requeue(
        self, *, microbatch_id: str, worker_id: str, model: str, batch_ids: Sequence[str], only_if_queued: bool,
        now: float, max_attempts: int, reason: str,
    ) -> RequeueReply:  # fmt: skip
        """Take a micro-batch back from ``worker_id`` and put its unfinished requests at the front of the ingress
        (``only_if_queued``: only if it never started); at ``max_attempts`` a request fails with ``reason``."""
        script_keys = [
            keys.microbatch_key(microbatch_id), keys.inflight_key(worker_id), keys.credit_key(worker_id),
            keys.rq_queue_key(worker_id), keys.rq_job_key(microbatch_id), keys.ingress_key(model),
            keys.ingress_tokens_key(model), keys.wakeup_key(), keys.ingress_requests_key(model),
        ]  # fmt: skip
        mode = "release" if only_if_queued else "recover"
        args: list[Arg] = [microbatch_id, mode, now, max_attempts, keys.WAKEUP_KEEP, worker_id, reason]
        for batch_id in batch_ids:
            script_keys += [
                keys.batch_key(batch_id),
                keys.batch_results_key(batch_id),
                keys.batch_requests_key(batch_id),
            ]
            args += [batch_id, keys.batch_events_channel(batch_id)]
        return self.run(ScriptCall(self._requeue, script_keys, args, _requeue_reply))

    def cancel(self, *, batch_id: str, model: str, now: float, runs: Sequence[CancelledRun]) -> int:
        """Remove these ``runs`` of a batch from the ingress and record their results; the requests cancelled here."""
        script_keys = [
            keys.ingress_key(model), keys.ingress_tokens_key(model), keys.batch_key(batch_id),
            keys.batch_results_key(batch_id), keys.batch_requests_key(batch_id), keys.ingress_requests_key(model),
        ]  # fmt: skip
        args: list[Arg] = [now, keys.batch_events_channel(batch_id)]
        for run in runs:
            args += [run.member, *(result.model_dump_json() for result in run.results)]
        return self.run(ScriptCall(self._cancel, script_keys, args, int))

    def publish(
        self, *, batch_id: str, model: str, record: Mapping[str, str | int | float], runs: Sequence[tuple[str, int]],
        tokens: int, requests: int, listed: bool,
    ) -> bool:  # fmt: skip
        """Make a staged batch visible: its ``record``, its ingress ``runs`` (member, score) and counters; False when
        it was already (a retry whose first reply was lost)."""
        script_keys = [
            keys.batch_requests_key(batch_id), keys.batch_key(batch_id), keys.batches_key(), keys.ingress_key(model),
            keys.ingress_tokens_key(model), keys.ingress_requests_key(model), keys.models_key(), keys.wakeup_key(),
        ]  # fmt: skip
        args: list[Arg] = [
            _flag(listed), keys.BATCH_INDEX_KEEP, batch_id, record["submitted_at"], tokens, requests, model,
            keys.wake_batch_token(batch_id), keys.WAKEUP_KEEP, len(record),
        ]  # fmt: skip
        for field, value in record.items():
            args += [field, value]
        for member, score in runs:
            args += [score, member]
        return self.run(ScriptCall(self._publish, script_keys, args, _published))


def _flag(on: bool) -> str:
    return "1" if on else ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dispatch_reply(raw: Any) -> DispatchReply:
    status, taken, tokens, next_cost, dropped = (int(x) for x in raw[:5])
    return DispatchReply(status, taken, tokens, next_cost, dropped, _text(raw[5]), _text(raw[6]))


def _start_reply(sizes: list[int], raw: Any) -> StartReply:
    """Per batch (of ``sizes`` requests): submitted_at, cancelled ('1' or ''), then per request: done, runs ('1' or
    ''), payload."""
    if raw is None:
        return None
    values = iter([None if v is None else _text(v) for v in raw])
    batches = []
    for size in sizes:
        submitted_at, cancelled = float(next(values) or 0.0), bool(next(values))
        requests = [StartedRequest(bool(next(values)), bool(next(values)), next(values)) for _ in range(size)]
        batches.append(StartedBatch(submitted_at, cancelled, requests))
    return batches


def _record_reply(raw: Any) -> RecordReply:
    return RecordReply(int(raw[0]), int(raw[1]))


def _requeue_reply(raw: Any) -> RequeueReply:
    requeued, dead_lettered, queued = (int(x) for x in raw)
    return RequeueReply(requeued, dead_lettered, queued > 0)


def _published(raw: Any) -> bool:
    return int(raw) == 1


def garbage_refusal(exc: redis.ResponseError) -> GarbageInRedis | None:
    """The refusal of a script that found garbage (``'GARBAGE <key> <what>'``, nothing written), else None."""
    text = str(exc)
    if not text.startswith("GARBAGE "):
        return None
    key, _, what = text.removeprefix("GARBAGE ").partition(" ")
    return GarbageInRedis(key, what.split(" script:")[0])
