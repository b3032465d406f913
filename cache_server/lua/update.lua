-- update: apply one training step's epsilon-greedy cache updates of one run, at most once per
-- (run, step, question). The choice was made by the caller; this script only applies or replays it.
--
-- KEYS[1]     the run's index set                  <prefix>:{<run>}:ids
-- KEYS[2]     the step's marker hash               <prefix>:{<run>}:u:<step>   (question id -> outcome)
-- KEYS[2+i]   the i-th group's entry hash          <prefix>:{<run>}:e:<question id>
-- ARGV[1]     now, unix seconds
-- ARGV[2]     marker lifetime in seconds
-- ARGV[3]     the step
-- ARGV[4..]   9 values per group, in KEYS order: question id, choice (best|other|none), stored index
--             ("" for none), packed token ids (uint32 LE, "" for none), length, reward, correct (0|1),
--             policy version, the group's shortest response length (kept even when choice is none)
-- Returns     one string per group: "<applied>:<choice>:<index>", applied 1 = applied now, 0 = this
--             (step, question) was applied before and nothing changed (the recorded outcome follows)
local now, ttl, step = ARGV[1], ARGV[2], ARGV[3]
local out = {}
local applied_any = false
for i = 3, #KEYS do
  local key = KEYS[i]
  local a = 4 + (i - 3) * 9
  local qid, choice, index = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local recorded = redis.call("HGET", KEYS[2], qid)
  if recorded then
    out[#out + 1] = "0:" .. recorded
  else
    if choice ~= "none" then
      redis.call("HSET", key,
        "ids", ARGV[a + 3], "len", ARGV[a + 4], "reward", ARGV[a + 5], "correct", ARGV[a + 6],
        "version", ARGV[a + 7], "lgml", ARGV[a + 8], "updated", now, "step", step)
      redis.call("HINCRBY", key, "updates", 1)
      if redis.call("HSETNX", key, "created", now) == 1 then
        redis.call("SADD", KEYS[1], qid)
      end
    elseif redis.call("EXISTS", key) == 1 then
      redis.call("HSET", key, "lgml", ARGV[a + 8])
    end
    local outcome = choice .. ":" .. index
    redis.call("HSET", KEYS[2], qid, outcome)
    applied_any = true
    out[#out + 1] = "1:" .. outcome
  end
end
if applied_any then redis.call("EXPIRE", KEYS[2], ttl) end
return out
