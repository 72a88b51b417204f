-- wrk script for POST /predict with a different iris-like row on every request.
--
-- Why per-request bodies: a constant body lets caches (ours or anything in
-- between) and branch predictors flatter the server; a fresh row per request
-- is closer to real traffic while staying cheap to generate in LuaJIT.
--
-- Usage:
--   wrk -t1 -c64 -d15s --latency -s benchmarks/wrk/predict.lua URL -- v1 [model] [distinct] [users]
-- With distinct > 0, rows come from a fixed set of that many (for the cache-hit scenarios).
-- Version "-" names none (the server's routing picks); "users" sends a random X-User-ID each request.
-- Model/version may also come from env vars MLSERVE_BENCH_MODEL_VERSION and
-- MLSERVE_BENCH_MODEL (the wrk args win).  done() comes from common.lua.

dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")

local model = os.getenv("MLSERVE_BENCH_MODEL") or "iris_classifier"
local version = os.getenv("MLSERVE_BENCH_MODEL_VERSION") or "v1"
local pool = nil
local users = false

function init(args)
   if args[1] ~= nil and args[1] ~= "" then version = args[1] end
   if args[2] ~= nil and args[2] ~= "" then model = args[2] end
   local distinct = tonumber(args[3] or "0") or 0
   users = args[4] == "users"
   if distinct > 0 then
      math.randomseed(42)  -- the same set on every run, so a warm-up fills the cache with it
      pool = {}
      for i = 1, distinct do pool[i] = iris_row() end
   end
   post("application/json")
end

function request()
   local f = pool and pool[math.random(#pool)] or iris_row()
   local pinned = version ~= "-" and string.format(',"model_version":"%s"', version) or ""
   local body = string.format(
      '{"features":[%.3f,%.3f,%.3f,%.3f],"model":"%s"%s}',
      f[1], f[2], f[3], f[4], model, pinned)
   if users then
      wrk.headers["X-User-ID"] = "user-" .. math.random(1000000)
   end
   return wrk.format(nil, nil, nil, body)
end
