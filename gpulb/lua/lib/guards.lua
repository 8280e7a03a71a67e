-- Redis does not roll back a script that fails half-way, so every script checks what it reads (types, numbers)
-- before its first write, and either does everything or refuses with nothing written.
-- A refusal is an error reply 'GARBAGE <key> <what>' (gpulb.errors.GarbageInRedis on the Python side).
-- A model's ingress counters are only sums of what its ingress holds: garbage there is repaired by counting again.

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
