-- wrk script for the Open Inference Protocol's binary tensor data extension: POST
-- /v2/models/NAME/versions/V/infer with N fresh random iris rows a request, as FP64 [N, 4] after a JSON
-- header of Inference-Header-Content-Length bytes, and the output asked for in binary too.
--
-- Usage: wrk -t1 -c64 -d10s --latency -s benchmarks/wrk/v2binary.lua URL -- 64
-- done() comes from common.lua. LuaJIT's ffi packs the doubles (little-endian on the hosts we run on).

dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")

local ffi = require("ffi")
local rows = 64
local values = nil
local header = nil

function init(args)
   rows = tonumber(args[1] or "64") or 64
   values = ffi.new("double[?]", rows * 4)
   header = string.format(
      '{"inputs":[{"name":"input-0","shape":[%d,4],"datatype":"FP64","parameters":{"binary_data_size":%d}}],' ..
      '"outputs":[{"name":"predict","parameters":{"binary_data":true}}]}', rows, rows * 32)
   post("application/octet-stream")
   wrk.headers["Inference-Header-Content-Length"] = tostring(#header)
end

function request()
   for r = 0, rows - 1 do
      local f = iris_row()
      for i = 1, 4 do
         values[r * 4 + i - 1] = f[i]
      end
   end
   return wrk.format(nil, nil, nil, header .. ffi.string(values, rows * 32))
end
