-- START: a worker hands a micro-batch's requests to its backend: from now on a crash costs each an attempt.
-- KEYS[1] micro-batch hash  KEYS[2+3(b-1)..] for batch b: batch hash, results hash, requests hash
-- ARGV per batch b: n, then n times: request field, its ingress member
-- Reads each request's payload (unless its result is recorded) and its batch's submitted_at and
-- cancelled_at; a request runs if it has a payload, no result and its batch is not cancelled.
-- Records the members that run in the micro-batch ('ran') and counts them as running, once (a
-- retried call changes nothing and reports the members recorded the first time). A batch whose keys hold
-- garbage runs nothing (its results could not be recorded), or runs without counts if only its record does.
-- Returns nil if the micro-batch was taken back meanwhile: do not run it. Otherwise per batch:
-- submitted_at, cancelled ('1' or ''), then per request: done ('1' or ''), runs ('1' or ''), payload.
local microbatch = KEYS[1]
local FIRST_BATCH_KEY = 2

-- The batches in KEYS order: {key, results, requests, items = {{field, member}, ...}}.
local function read_batches()
  local batches, pos = {}, 1
  while pos <= #ARGV do
    local at, n = FIRST_BATCH_KEY + 3 * #batches, tonumber(ARGV[pos])
    local batch = {key = KEYS[at], results = KEYS[at + 1], requests = KEYS[at + 2], items = {}}
    for i = 1, n do batch.items[i] = {field = ARGV[pos + 2 * i - 1], member = ARGV[pos + 2 * i]} end
    batches[#batches + 1] = batch
    pos = pos + 1 + 2 * n
  end
  return batches
end
local batches = read_batches()

if redis.call('EXISTS', microbatch) == 0 or bad_type(microbatch, 'hash') then return false end
for _, batch in ipairs(batches) do
  batch.condition = batch_condition(batch.key, batch.results, batch.requests)
end
local before = redis.call('HGET', microbatch, 'ran')
local known = {}
for m in string.gmatch(before or '', '%S+') do known[m] = true end
local out, ran = {}, {}
for _, batch in ipairs(batches) do
  local condition = batch.condition
  local meta = {false, false}
  if condition == 'ok' or condition == 'results' then
    meta = redis.call('HMGET', batch.key, 'submitted_at', 'cancelled_at')
  end
  local readable = condition ~= 'garbage'
  local cancelled = meta[2] ~= false
  out[#out + 1] = meta[1] or '0'
  out[#out + 1] = cancelled and '1' or ''
  local started = 0
  for _, item in ipairs(batch.items) do
    local done = readable and redis.call('HEXISTS', batch.results, item.field) == 1
    local payload = false
    if readable and not done then payload = redis.call('HGET', batch.requests, item.field) end
    local runs = known[item.member] == true
    if not before then runs = not done and not cancelled and payload ~= false and condition ~= 'gone' end
    if runs then ran[#ran + 1] = item.member; started = started + 1 end
    out[#out + 1] = done and '1' or ''
    out[#out + 1] = runs and '1' or ''
    out[#out + 1] = payload
  end
  if not before and started > 0 and condition == 'ok' then
    redis.call('HINCRBY', batch.key, 'running', started)
    if redis.call('HGET', batch.key, 'state') == 'pending' then redis.call('HSET', batch.key, 'state', 'running') end
  end
end
if not before then redis.call('HSET', microbatch, 'ran', table.concat(ran, ' ')) end
return out
