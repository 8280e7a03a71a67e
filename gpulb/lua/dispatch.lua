-- DISPATCH: cut one micro-batch from a model's ingress and enqueue it as ONE RQ job on a worker's queue.
-- KEYS[1] ingress zset        KEYS[2] ingress_tokens     KEYS[3] worker load hash
-- KEYS[4] worker credit hash  KEYS[5] worker inflight    KEYS[6] micro-batch hash
-- KEYS[7] rq job hash         KEYS[8] rq queue list      KEYS[9] rq:queues set
-- KEYS[10] affinity owners hash (affinity key -> worker id)  KEYS[11] ingress_requests
-- ARGV[1] micro-batch id (= RQ job id)  ARGV[2] worker id  ARGV[3] model
-- ARGV[4] max requests  ARGV[5] token budget  ARGV[6] max outstanding micro-batches
-- ARGV[7] now (epoch s)  ARGV[8] '1' to respect affinity owners  ARGV[9] members to scan with affinity
-- ARGV[10] owners whose keys may be taken over (space-separated)  ARGV[11] owners-hash TTL (s)
-- ARGV[12] '1' to count credit in engine slots for a continuous worker (its load hash has slots > 0: it may hold
-- slots + queue_slots requests)  ARGV[13] '1' to take the longest first (the tail of a backlog)
-- ARGV[14..] RQ job hash field, value, ...
-- Takes requests from the front while they fit the budget (always at least one), splitting the
-- member it stops in: the rest of that run goes back with the score of its first request. With
-- affinity, it skips members whose key another worker owns (unless that owner is listed as free),
-- and records this worker as the owner of the keys it takes. The micro-batch lists one member per
-- request, and their scores as runs 'SCORExCOUNT' (COUNT consecutive scores from SCORE).
-- Idempotent per micro-batch id (a retried call changes nothing and reports status 1 again).
-- Returns {status, taken, tokens, next_cost, dropped, next_affinity, next_owner}: status 1
-- dispatched, 0 ingress empty, -1 worker not accepting (gone, draining, other model), -2 no
-- credit, -3 nothing this worker may take.
local ingress, ingress_tokens, load_key, credit_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local inflight, microbatch, rq_job, rq_queue, rq_queues = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local owners_key, ingress_requests = KEYS[10], KEYS[11]
local microbatch_id, me, model = ARGV[1], ARGV[2], ARGV[3]
local max_count, budget, max_outstanding, now = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local affinity_on, affinity_scan, free_owners = ARGV[8] == '1', tonumber(ARGV[9]), ARGV[10]
local owners_ttl_s, credit_in_slots, longest_first = tonumber(ARGV[11]), ARGV[12] == '1', ARGV[13] == '1'
local function rq_job_fields() return unpack(ARGV, 14) end

if redis.call('EXISTS', microbatch) == 1 or redis.call('EXISTS', rq_job) == 1 then
  -- this micro-batch id was dispatched already: a client retrying a call whose reply it lost
  local done = redis.call('HMGET', microbatch, 'count', 'tokens')
  return {1, tonumber(done[1] or '0'), tonumber(done[2] or '0'), 0, 0, '', ''}  -- next head unknown: look again
end
if bad_type(load_key, 'hash') then return {-1, 0, 0, -1, 0, '', ''} end  -- a load key that is not ours: no worker
local load = redis.call('HMGET', load_key, 'state', 'model', 'slots', 'queue_slots')
if (load[1] ~= 'idle' and load[1] ~= 'busy') or load[2] ~= model then
  return {-1, 0, 0, -1, 0, '', ''}
end
for _, check in ipairs({{ingress, 'zset'}, {inflight, 'set'}, {rq_queue, 'list'}, {rq_queues, 'set'},
    {owners_key, 'hash'}, {microbatch, 'hash'}, {rq_job, 'hash'}}) do
  local why = bad_type(check[1], check[2])
  if why then return refuse(check[1], why) end
end
local why = bad_hash(credit_key, {'batches', 'requests', 'tokens'})
if why then return refuse(credit_key, why) end
local credit = redis.call('HMGET', credit_key, 'batches', 'requests')
local slots = tonumber(load[3] or '0') or 0
if tonumber(credit[1] or '0') >= max_outstanding or (credit_in_slots and slots > 0
    and tonumber(credit[2] or '0') >= slots + (tonumber(load[4] or '0') or 0)) then
  return {-2, 0, 0, -1, 0, '', ''}
end
local free, owners = {}, {}
for w in string.gmatch(free_owners, '%S+') do free[w] = true end
local function may_take(key)
  if not affinity_on or key == '' then return true end
  if owners[key] == nil then owners[key] = redis.call('HGET', owners_key, key) or '' end
  local owner = owners[key]
  return owner == '' or owner == me or free[owner] == true
end
local scan = max_count
if affinity_on or longest_first then scan = math.max(max_count, affinity_scan) end
repair_ingress_counters(ingress, ingress_tokens, ingress_requests)  -- the first write: every read above was checked
local head = redis.call('ZRANGE', ingress, 0, scan - 1, 'WITHSCORES')

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
  if #remove > 0 then redis.call('ZREM', ingress, unpack(remove)) end
  if rest then redis.call('ZADD', ingress, rest_score, rest) end
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
    redis.call('ZREM', ingress, head[i])
    local from = nil
    for k = 1, #p[5] + 1 do
      if k <= #p[5] and not ks[k] then
        from = from or k
      elseif from ~= nil then
        local kept = {}
        for j = from, k - 1 do kept[#kept + 1] = p[5][j] end
        redis.call('ZADD', ingress, score_text(tonumber(head[i + 1]) + from - 1),
          member_of(p[1], p[2] + from - 1, p[3], p[4], table.concat(kept, ',')))
        from = nil
      end
    end
  end
  return members, scores, tokens, 0, claimed
end

local members, scores, tokens, dropped, claimed
if longest_first then members, scores, tokens, dropped, claimed = cut_longest_first() end
if members == nil then members, scores, tokens, dropped, claimed = cut_in_order() end
if #members == 0 then
  local status = 0
  if redis.call('ZCARD', ingress) > 0 then status = -3 end
  return {status, 0, 0, -1, dropped, '', ''}
end
for _, key in ipairs(claimed) do redis.call('HSET', owners_key, key, me) end
if #claimed > 0 then redis.call('EXPIRE', owners_key, owners_ttl_s) end
redis.call('DECRBY', ingress_tokens, tokens)
redis.call('DECRBY', ingress_requests, #members)
redis.call('HSET', microbatch, 'worker', me, 'model', model, 'tokens', tokens, 'count', #members,
  'entries', table.concat(members, ' '), 'scores', table.concat(scores, ' '), 'created_at', now)
redis.call('SADD', inflight, microbatch_id)
redis.call('HINCRBY', credit_key, 'batches', 1)
redis.call('HINCRBY', credit_key, 'tokens', tokens)
redis.call('HINCRBY', credit_key, 'requests', #members)
redis.call('HSET', rq_job, rq_job_fields())
redis.call('RPUSH', rq_queue, microbatch_id)
redis.call('SADD', rq_queues, rq_queue)
local next_cost, next_key, next_owner = -1, '', ''
local nxt = redis.call('ZRANGE', ingress, 0, 0)
if #nxt > 0 then
  local bid, _, _, key, costs = parse_member(nxt[1])
  next_cost, next_key = 0, ''
  if bid then next_cost, next_key = costs[1], key end
  if affinity_on and next_key ~= '' then next_owner = redis.call('HGET', owners_key, next_key) or '' end
end
return {1, #members, tokens, next_cost, dropped, next_key, next_owner}
