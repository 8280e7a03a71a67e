-- REQUEUE: take a micro-batch back from a worker and put its unfinished requests at the front of the
-- ingress (their original scores). With '1' for 'only if queued' (release): only if still queued (a draining
-- worker hands back what it has not started). Otherwise (recover): whatever its state (its worker is dead).
-- A request that had started running (START) counts one more attempt; at max_attempts it is
-- recorded as failed with the reason instead (dead letter). Recorded requests are not re-run.
-- KEYS[1] micro-batch hash  KEYS[2] worker inflight  KEYS[3] worker credit  KEYS[4] rq queue list
-- KEYS[5] rq job hash  KEYS[6] ingress zset  KEYS[7] ingress_tokens  KEYS[8] wakeup list
-- KEYS[9] ingress_requests  KEYS[10+3(b-1)..] for batch b: batch hash, results hash, requests hash
-- ARGV[1] micro-batch id  ARGV[2] '1': only if queued  ARGV[3] now  ARGV[4] max attempts  ARGV[5] wakeup keep
-- ARGV[6] the worker's wake-up token  ARGV[7] the dead letter: a failed result's JSON (gpulb.models.Result, with
-- the worker and the reason) whose request_id, index, attempts, custom_id and times are filled in here, as only
-- this script knows which requests die and their batch's submitted_at and custom_id at that moment (reading them
-- first would cost a round trip and race with the worker)
-- ARGV[8..] per batch b: batch id, events channel
-- Returns {requeued, dead_lettered, was_queued}.
local microbatch, inflight, credit, rq_queue, rq_job = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ingress, ingress_tokens, wakeup, ingress_requests = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local microbatch_id, only_if_queued, now, max_attempts = ARGV[1], ARGV[2] == '1', ARGV[3], tonumber(ARGV[4])
local wakeup_keep, wake_token, dead_letter = ARGV[5], ARGV[6], ARGV[7]
local FIRST_BATCH_KEY, FIRST_BATCH_ARG = 10, 8

-- The batches in KEYS order: {id, key, results, requests, channel}.
local function read_batches()
  local batches = {}
  for pos = FIRST_BATCH_ARG, #ARGV - 1, 2 do
    local at = FIRST_BATCH_KEY + 3 * #batches
    batches[#batches + 1] = {id = ARGV[pos], channel = ARGV[pos + 1], key = KEYS[at], results = KEYS[at + 1],
                             requests = KEYS[at + 2]}
  end
  return batches
end
local batches = read_batches()

local why = bad_type(microbatch, 'hash') or bad_type(ingress, 'zset')
if why then return refuse(microbatch .. ' or ' .. ingress, why) end
local mb = redis.call('HMGET', microbatch, 'entries', 'scores', 'tokens', 'ran')
if not mb[1] then return {0, 0, 0} end
local queue_ok = bad_type(rq_queue, 'list') == nil
local queued = 0
if queue_ok then queued = redis.call('LREM', rq_queue, 0, microbatch_id) end  -- LREM of an absent id writes nothing
if only_if_queued and queued == 0 then return {0, 0, 0} end
-- every read below is checked before the first write that can fail
local credit_ok = bad_hash(microbatch, {'tokens', 'count'}) == nil and bad_type(inflight, 'set') == nil
  and bad_hash(credit, {'batches', 'tokens', 'requests'}) == nil
local by_id = {}
for _, batch in ipairs(batches) do
  by_id[batch.id] = batch
  batch.condition = batch_condition(batch.key, batch.results, batch.requests)
  batch.running, batch.dead = 0, 0
end
local scores = {}
for first, count in string.gmatch(mb[2] or '', '(%S+)x(%d+)') do
  for k = 0, tonumber(count) - 1 do scores[#scores + 1] = score_text((tonumber(first) or 0) + k) end
end
if bad_type(wakeup, 'list') then redis.call('DEL', wakeup) end  -- wake-up tokens only say 'look again'
repair_ingress_counters(ingress, ingress_tokens, ingress_requests)
if queued > 0 then redis.call('DEL', rq_job) end
local ran = {}
for m in string.gmatch(mb[4] or '', '%S+') do ran[m] = true end
local failed = cjson.decode(dead_letter)
local tokens, requeued, i = 0, 0, 0
for member in string.gmatch(mb[1], '%S+') do
  i = i + 1
  local bid, idx, attempt, affinity, costs = parse_member(member)  -- one request
  local batch = bid and by_id[bid]
  -- dropped: a member that is not ours, or of a batch that is gone or whose results could never be recorded
  local condition = batch and batch.condition or 'gone'
  if (condition == 'ok' or condition == 'results') and redis.call('HEXISTS', batch.results, idx) == 0 then
    local next_attempt = tonumber(attempt)
    if ran[member] then
      next_attempt = next_attempt + 1
      batch.running = batch.running + 1
    end
    if next_attempt >= max_attempts then
      local submitted = tonumber(redis.call('HGET', batch.key, 'submitted_at') or now) or tonumber(now)
      failed.request_id, failed.index, failed.attempts = bid .. '-' .. idx, idx, next_attempt
      failed.submitted_at, failed.started_at, failed.finished_at = submitted, tonumber(now), tonumber(now)
      failed.custom_id = custom_id_of(batch.requests, idx)
      redis.call('HSET', batch.results, idx, cjson.encode(failed))
      redis.call('HDEL', batch.requests, idx)
      batch.dead = batch.dead + 1
    else
      redis.call('ZADD', ingress, scores[i] or score_text(0), member_of(bid, idx, next_attempt, affinity, costs[1]))
      tokens = tokens + costs[1]
      requeued = requeued + 1
    end
  end
end
local dead_total = 0
for _, batch in ipairs(batches) do
  if batch.condition == 'ok' then
    if batch.running > 0 then redis.call('HINCRBY', batch.key, 'running', -batch.running) end
    if batch.dead > 0 then
      settle_batch(batch.key, batch.results, batch.requests, batch.channel, now, 0, batch.dead, 0)
    end
  end
  dead_total = dead_total + batch.dead
end
redis.call('INCRBY', ingress_tokens, tokens)
redis.call('INCRBY', ingress_requests, requeued)
if credit_ok then
  release_credit(microbatch, inflight, credit, microbatch_id, wakeup, wakeup_keep, wake_token)
else  -- a micro-batch record or credit that is not ours: forget it, the balancer refuses garbage credit
  redis.call('DEL', microbatch)
  if bad_type(inflight, 'set') == nil then redis.call('SREM', inflight, microbatch_id) end
end
return {requeued, dead_total, queued}
