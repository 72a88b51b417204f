-- wrk script for POST /predict with a different iris-like row on every request.
--
-- Why per-request bodies: a constant body lets caches (ours or anything in
-- between) and branch predictors flatter the server; a fresh row per request
-- is closer to real traffic while staying cheap to generate in LuaJIT.
--
-- Usage:
--   wrk -t1 -c64 -d15s --latency -s benchmarks/wrk/predict.lua URL -- v1 [model]
-- Model/version may also come from env vars MLSERVE_BENCH_MODEL_VERSION and
-- MLSERVE_BENCH_MODEL (the wrk args win).  done() prints exactly one line
-- starting with "WRKJSON " followed by a JSON object the harness parses;
-- latencies are in microseconds, duration too.

local model = os.getenv("MLSERVE_BENCH_MODEL") or "iris_classifier"
local version = os.getenv("MLSERVE_BENCH_MODEL_VERSION") or "v1"
local counter = 0

-- Iris feature ranges (min, max): sepal length/width, petal length/width.
local lo = { 4.3, 2.0, 1.0, 0.1 }
local hi = { 7.9, 4.4, 6.9, 2.5 }

function init(args)
   if args[1] ~= nil and args[1] ~= "" then version = args[1] end
   if args[2] ~= nil and args[2] ~= "" then model = args[2] end
   -- Seed from time and address of a fresh table so threads differ.
   math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end

function request()
   counter = counter + 1
   local f = {}
   for i = 1, 4 do
      f[i] = lo[i] + (hi[i] - lo[i]) * math.random()
   end
   local body = string.format(
      '{"features":[%.3f,%.3f,%.3f,%.3f],"model":"%s","model_version":"%s"}',
      f[1], f[2], f[3], f[4], model, version)
   return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"non2xx":%d,"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f,"stdev":%.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.status, e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean, latency.stdev))
end
