-- wrk script for the peer, MLServer: POST /v2/models/NAME/infer (Open Inference Protocol v2)
-- with a fresh random iris row on every request, as predict.lua sends to mlserve.
--
-- Usage: wrk -t1 -c64 -d10s --latency -s benchmarks/wrk/v2infer.lua URL
-- done() comes from common.lua.

dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")

function init(args)
   post("application/json")
end

function request()
   return row_request('{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP64","data":[%.3f,%.3f,%.3f,%.3f]}]}')
end
