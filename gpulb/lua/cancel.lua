-- CANCEL: cancel what of a batch still waits in the ingress: remove it and record it as cancelled.
-- (Requests already in a worker's queue are cancelled by that worker when it reaches them.)
-- KEYS[1] ingress zset  KEYS[2] ingress_tokens  KEYS[3] batch hash  KEYS[4] results hash
-- KEYS[5] requests hash  KEYS[6] ingress_requests
-- ARGV[1] now  ARGV[2] events channel  ARGV[3..] per ingress member: the member, then the cancelled
-- result JSON (gpulb.models.Result) of each of its requests in order
-- A result gets its request's custom_id here: it is read from the payload that this script deletes, in the same
-- atomic step (reading it first would cost a round trip and race with a worker recording the request).
-- Returns the number of requests cancelled here.
local ingress, ingress_tokens, ingress_requests = KEYS[1], KEYS[2], KEYS[6]
local batch, results, requests = KEYS[3], KEYS[4], KEYS[5]
local now, channel = ARGV[1], ARGV[2]
local FIRST_RUN_ARG = 3

-- The runs to cancel: {member, start, costs, results = {JSON, ...}} (one result per cost).
local function read_runs()
  local runs, pos = {}, FIRST_RUN_ARG
  while pos <= #ARGV do
    local _, start, _, _, costs = parse_member(ARGV[pos])
    local texts = {unpack(ARGV, pos + 1, pos + #costs)}
    runs[#runs + 1] = {member = ARGV[pos], start = start, costs = costs, results = texts}
    pos = pos + 1 + #costs
  end
  return runs
end
local runs = read_runs()

local why = bad_type(ingress, 'zset')
if why then return refuse(ingress, why) end
if batch_condition(batch, results, requests) ~= 'ok' then return refuse(batch, 'is not a batch gpulb wrote') end
repair_ingress_counters(ingress, ingress_tokens, ingress_requests)
if not redis.call('HGET', batch, 'cancelled_at') then redis.call('HSET', batch, 'cancelled_at', now) end
local n, removed, tokens = 0, 0, 0
for _, run in ipairs(runs) do
  if redis.call('ZREM', ingress, run.member) == 1 then
    for k = 1, #run.costs do
      local field = string.format('%d', run.start + k - 1)
      local result = cjson.decode(run.results[k])
      result['custom_id'] = custom_id_of(requests, field)
      if redis.call('HSETNX', results, field, cjson.encode(result)) == 1 then n = n + 1 end
      redis.call('HDEL', requests, field)
      tokens = tokens + run.costs[k]
    end
    removed = removed + #run.costs
  end
end
redis.call('DECRBY', ingress_tokens, tokens)
redis.call('DECRBY', ingress_requests, removed)
settle_batch(batch, results, requests, channel, now, 0, 0, n)
return n
