-- wrk script for MLflow's scoring protocol, POST /invocations?model=NAME&version=V (the URL names the
-- model): a one-row dataframe_split body with a fresh random iris row on every request, as predict.lua
-- sends to /predict. The argument is the columns' names as a JSON array (the harness passes them).
--
-- Usage: wrk -t1 -c64 -d10s --latency -s benchmarks/wrk/invocations.lua URL -- '["a","b","c","d"]'
-- done() comes from common.lua.

dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")

local template = nil

function init(args)
   template = '{"dataframe_split":{"columns":' .. args[1] .. ',"data":[[%.3f,%.3f,%.3f,%.3f]]}}'
   post("application/json")
end

function request()
   return row_request(template)
end
