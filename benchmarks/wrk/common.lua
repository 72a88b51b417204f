-- What every request script shares, loaded with dofile(): post(), iris_row(), row_request() and done().

-- Iris feature ranges (min, max): sepal length/width, petal length/width.
local lo = { 4.3, 2.0, 1.0, 0.1 }
local hi = { 7.9, 4.4, 6.9, 2.5 }

-- Every request a POST of content_type; math.random seeded from the time and
-- the address of a fresh table, so threads differ.
function post(content_type)
   math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = content_type
end

-- A fresh random iris row, so that no cache could answer.
function iris_row()
   local f = {}
   for i = 1, 4 do
      f[i] = lo[i] + (hi[i] - lo[i]) * math.random()
   end
   return f
end

-- A request whose body is `template` with a fresh iris row's four values in its four %.3f.
function row_request(template)
   local f = iris_row()
   return wrk.format(nil, nil, nil, string.format(template, f[1], f[2], f[3], f[4]))
end

-- Prints exactly one line starting with "WRKJSON " followed by a JSON object
-- the harness parses; latencies are in microseconds, duration too.

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
