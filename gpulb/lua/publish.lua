-- PUBLISH: make a staged batch visible: its record, its ingress members and counters, a wake-up, all or nothing.
-- KEYS[1] requests hash (staged payloads)  KEYS[2] batch hash  KEYS[3] batch index zset  KEYS[4] ingress zset
-- KEYS[5] ingress_tokens  KEYS[6] ingress_requests  KEYS[7] models set  KEYS[8] wakeup list
-- ARGV[1] '1' to list the batch  ARGV[2] how many batches the index keeps  ARGV[3] batch id
-- ARGV[4] submitted_at  ARGV[5] tokens  ARGV[6] requests  ARGV[7] model  ARGV[8] wake-up token
-- ARGV[9] wake-up list length to keep  ARGV[10] R  ARGV[11..10+2R] batch record field, value, ...
-- ARGV[11+2R..] ingress score, member, ...
-- Returns 1 when published, 0 when it was already (a retry whose first reply was lost).
local requests, batch, batch_index, ingress = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ingress_tokens, ingress_requests, models, wakeup = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local listed, index_keep, batch_id, submitted_at = ARGV[1] == '1', tonumber(ARGV[2]), ARGV[3], ARGV[4]
local tokens, request_count, model, wake_token, wakeup_keep = ARGV[5], ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])
local FIRST_RECORD_ARG = 11
local FIRST_ENTRY_ARG = FIRST_RECORD_ARG + 2 * tonumber(ARGV[10])

local function record_fields() return unpack(ARGV, FIRST_RECORD_ARG, FIRST_ENTRY_ARG - 1) end

-- Calls add(score, member, ...) on the ingress entries in slices: unpack has a limit of a few thousand values.
local function each_entry_slice(add)
  for first = FIRST_ENTRY_ARG, #ARGV, 4000 do add(unpack(ARGV, first, math.min(#ARGV, first + 3999))) end
end

if redis.call('EXISTS', batch) == 1 then return 0 end
local why = bad_type(requests, 'hash')
if why then return refuse(requests, why) end
if redis.call('EXISTS', requests) == 0 then return refuse(requests, 'is gone: the staged requests expired') end
for _, check in ipairs({{batch_index, 'zset'}, {ingress, 'zset'}, {models, 'set'}}) do
  why = bad_type(check[1], check[2])
  if why then return refuse(check[1], why) end
end
-- every read is checked: from here on nothing fails
if bad_type(wakeup, 'list') then redis.call('DEL', wakeup) end  -- wake-up tokens only say 'look again'
repair_ingress_counters(ingress, ingress_tokens, ingress_requests)
redis.call('PERSIST', requests)
redis.call('HSET', batch, record_fields())
if listed then
  redis.call('ZADD', batch_index, submitted_at, batch_id)
  redis.call('ZREMRANGEBYRANK', batch_index, 0, -index_keep - 1)
end
each_entry_slice(function(...) redis.call('ZADD', ingress, ...) end)
redis.call('INCRBY', ingress_tokens, tokens)
redis.call('INCRBY', ingress_requests, request_count)
redis.call('SADD', models, model)
redis.call('RPUSH', wakeup, wake_token)
redis.call('LTRIM', wakeup, -wakeup_keep, -1)
return 1
