-- RECORD: record finished requests of a micro-batch, each result only if none is recorded yet, and settle
-- counters. A continuous worker records requests as each finishes (several calls per micro-batch);
-- the call with final '1' (after every request has a result) releases what the micro-batch still holds.
-- KEYS[1] micro-batch hash  KEYS[2] worker inflight  KEYS[3] worker credit  KEYS[4] wakeup list
-- KEYS[5] the model's output-length stats hash
-- KEYS[6+3(b-1)..] for batch b: batch hash, results hash, requests hash
-- ARGV[1] micro-batch id  ARGV[2] now  ARGV[3] wakeup list length to keep  ARGV[4] the worker's wake-up token
-- ARGV[5] '1' if final  ARGV[6] output tokens of requests that stopped by themselves  ARGV[7] their number
-- ARGV[8] wake the balancer only once the worker holds at most this many requests ('' : always)
-- ARGV[9..] per batch b: events channel, number of results n,
--           then n times: field, ingress member, result JSON (gpulb.models.Result), outcome ('0' completed,
--           '1' failed, '2' cancelled), cost, '1' if it was counted as running
-- Each request is settled once per micro-batch (a mark '=MEMBER' in the micro-batch hash, so a retried
-- call changes nothing twice): its credit (cost, one request) is given back and, if it was running, the
-- batch's running count drops. A micro-batch that was taken back meanwhile (its worker looked dead)
-- still records results that are not recorded yet, but no longer touches credit or running counts.
-- Returns {results newly recorded, batches or keys left alone because they held garbage}.
local microbatch, inflight, credit, wakeup, lengths = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local microbatch_id, now, wakeup_keep, wake_token = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local final, stopped_tokens, stopped_count, wake_at = ARGV[5] == '1', ARGV[6], ARGV[7], tonumber(ARGV[8])
local FIRST_BATCH_KEY, FIRST_BATCH_ARG, ITEM_ARGS = 6, 9, 6

-- The batches in KEYS order: {key, results, requests, channel, items = {{field, member, result, outcome, cost,
-- running}, ...}}.
local function read_batches()
  local batches, pos = {}, FIRST_BATCH_ARG
  while pos <= #ARGV do
    local at, n = FIRST_BATCH_KEY + 3 * #batches, tonumber(ARGV[pos + 1])
    local batch = {key = KEYS[at], results = KEYS[at + 1], requests = KEYS[at + 2], channel = ARGV[pos], items = {}}
    for i = 1, n do
      local p = pos + 2 + ITEM_ARGS * (i - 1)
      batch.items[i] = {field = ARGV[p], member = ARGV[p + 1], result = ARGV[p + 2], outcome = ARGV[p + 3],
                        cost = tonumber(ARGV[p + 4]), running = ARGV[p + 5] == '1'}
    end
    batches[#batches + 1] = batch
    pos = pos + 2 + ITEM_ARGS * n
  end
  return batches
end
local batches = read_batches()

local garbage = 0
local owned = redis.call('EXISTS', microbatch) == 1
if owned and (bad_hash(microbatch, {'tokens', 'count'}) or bad_hash(credit, {'batches', 'tokens', 'requests'})
    or bad_type(inflight, 'set')) then
  owned, garbage = false, garbage + 1  -- the credit of this micro-batch is garbage: record, touch no credit
end
local wakeable = bad_type(wakeup, 'list') == nil
local learn = tonumber(stopped_count) > 0 and bad_hash(lengths, {'count', 'tokens'}) == nil
for _, batch in ipairs(batches) do
  batch.condition = batch_condition(batch.key, batch.results, batch.requests)
  if batch.condition == 'results' or batch.condition == 'garbage' then garbage = garbage + 1 end
end
if not wakeable then garbage = garbage + 1 end
-- every read is checked: from here on nothing fails
local recorded, freed_tokens, freed, wake = 0, 0, 0, true
for _, batch in ipairs(batches) do
  local condition = batch.condition
  local counts, running = {['0'] = 0, ['1'] = 0, ['2'] = 0}, 0
  for _, item in ipairs(batch.items) do
    if (condition == 'ok' or condition == 'results')
        and redis.call('HSETNX', batch.results, item.field, item.result) == 1 then
      counts[item.outcome] = counts[item.outcome] + 1
      redis.call('HDEL', batch.requests, item.field)
    end
    if owned and redis.call('HSETNX', microbatch, '=' .. item.member, 1) == 1 then
      freed_tokens = freed_tokens + item.cost
      freed = freed + 1
      if item.running then running = running + 1 end
    end
  end
  if condition == 'ok' then
    if running > 0 then redis.call('HINCRBY', batch.key, 'running', -running) end
    settle_batch(batch.key, batch.results, batch.requests, batch.channel, now, counts['0'], counts['1'], counts['2'])
  end
  recorded = recorded + counts['0'] + counts['1'] + counts['2']
end
if learn then
  local seen = redis.call('HINCRBY', lengths, 'count', stopped_count)
  local total = redis.call('HINCRBY', lengths, 'tokens', stopped_tokens)
  if seen > 20000 then  -- forget slowly: halve both, so the mean follows a model whose outputs change
    redis.call('HSET', lengths, 'count', math.floor(seen / 2), 'tokens', math.floor(total / 2))
  end
end
if not wakeable then redis.call('DEL', wakeup) end  -- wake-up tokens only say 'look again': a fresh list is safe
if owned then
  if final then
    release_credit(microbatch, inflight, credit, microbatch_id, wakeup, wakeup_keep, wake_token)
  else
    redis.call('HINCRBY', microbatch, 'tokens', -freed_tokens)
    redis.call('HINCRBY', microbatch, 'count', -freed)
    redis.call('HINCRBY', credit, 'tokens', -freed_tokens)
    local held = redis.call('HINCRBY', credit, 'requests', -freed)
    wake = wake_at == nil or held <= wake_at  -- no round trip of the balancer for a slot or two
  end
end
if wake and (not owned or not final) then
  redis.call('RPUSH', wakeup, wake_token)
  redis.call('LTRIM', wakeup, -wakeup_keep, -1)
end
return {recorded, garbage}
