-- read_prefixes: the fields prefix retrieval needs, for a batch of one run's entries, in one call.
-- One script reply replaces a pipeline of HMGETs: redis-py packs and parses one command instead of one
-- per question, which was most of the service's time per batch (docs/benchmarks.md, "Cache server").
-- Read-only: it changes nothing, so a retried call is harmless.
--
-- KEYS[i]     the i-th question's entry hash       <prefix>:{<run>}:e:<question id>
-- Returns     one array per key, in KEYS order: {ids, version, lgml}; a missing entry or field is nil
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call("HMGET", KEYS[i], "ids", "version", "lgml")
end
return out
