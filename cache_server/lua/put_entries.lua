-- put_entries: write a batch of cache entries of one run, atomically (all of them or none).
--
-- KEYS[1]     the run's index set                  <prefix>:{<run>}:ids
-- KEYS[1+i]   the i-th entry's hash                <prefix>:{<run>}:e:<question id>
-- ARGV[1]     overwrite: "1" replaces existing entries, "0" leaves them alone (a resumable init)
-- ARGV[2]     now, unix seconds (the server's clock)
-- ARGV[3..]   11 values per entry, in KEYS order: question id, packed token ids (uint32 LE), length,
--             reward, correct (0|1), policy version, last group min length ("" = none),
--             created at ("" = now), updated at ("" = now), update count, last step ("" = none)
-- Returns     one integer per entry: 1 written, 0 skipped (it existed and overwrite was "0")
local overwrite = ARGV[1] == "1"
local now = ARGV[2]
local out = {}
for i = 2, #KEYS do
  local key = KEYS[i]
  local a = 3 + (i - 2) * 11
  if not overwrite and redis.call("EXISTS", key) == 1 then
    out[#out + 1] = 0
  else
    local created, updated = ARGV[a + 7], ARGV[a + 8]
    if created == "" then created = now end
    if updated == "" then updated = now end
    redis.call("DEL", key)
    redis.call("HSET", key,
      "ids", ARGV[a + 1], "len", ARGV[a + 2], "reward", ARGV[a + 3], "correct", ARGV[a + 4],
      "version", ARGV[a + 5], "created", created, "updated", updated, "updates", ARGV[a + 9])
    if ARGV[a + 6] ~= "" then redis.call("HSET", key, "lgml", ARGV[a + 6]) end
    if ARGV[a + 10] ~= "" then redis.call("HSET", key, "step", ARGV[a + 10]) end
    redis.call("SADD", KEYS[1], ARGV[a])
    out[#out + 1] = 1
  end
end
return out
