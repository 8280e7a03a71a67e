-- After results were added to a batch, mark it completed (and set its expiry) when every request has one, and tell
-- waiting producers; give a micro-batch's credit back.

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

-- wake_token: gpulb.keys.wake_worker_token of the worker whose credit this frees.
local function release_credit(mbkey, inflight, credit, mb_id, wakeup, keep, wake_token)
  local mb = redis.call('HMGET', mbkey, 'tokens', 'count')
  redis.call('DEL', mbkey)
  redis.call('SREM', inflight, mb_id)
  redis.call('HINCRBY', credit, 'batches', -1)
  redis.call('HINCRBY', credit, 'tokens', 0 - tonumber(mb[1]))
  redis.call('HINCRBY', credit, 'requests', 0 - tonumber(mb[2] or '0'))
  redis.call('RPUSH', wakeup, wake_token)
  redis.call('LTRIM', wakeup, -tonumber(keep), -1)
end
