-- Ingress members "BATCH:START:ATTEMPT:AFFINITY:COST,COST,..." (gpulb.keys.ingress_member).
-- split_member -> batch, start, attempt, affinity, the costs' text; nil if the member is foreign.
-- parse_member -> the same with the costs as a list of numbers.
-- Scores are integers below 2**53: '%.17g' writes them back exactly (Lua's own tostring would not).

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
