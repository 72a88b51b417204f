-- wrk script for POST /predict/image: the next of many distinct PNG images on
-- every request, sent as the raw body with Content-Type image/png.
--
-- The harness writes the images to one file, each as a 4-byte big-endian
-- length and the PNG bytes, and passes its path as the script's argument:
--   wrk -t1 -c64 -d15s --latency -s benchmarks/wrk/image.lua URL -- images.bin
-- done() comes from common.lua.

dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")

local bodies = {}
local next_body = 0

function init(args)
   local file = assert(io.open(args[1], "rb"))
   local data = file:read("*a")
   file:close()
   local pos = 1
   while pos + 3 <= #data do
      local a, b, c, d = data:byte(pos, pos + 3)
      local size = ((a * 256 + b) * 256 + c) * 256 + d
      bodies[#bodies + 1] = data:sub(pos + 4, pos + 3 + size)
      pos = pos + 4 + size
   end
   assert(#bodies > 0, "no images in " .. args[1])
   post("image/png")
   next_body = math.random(#bodies) - 1
end

function request()
   next_body = next_body % #bodies + 1
   return wrk.format(nil, nil, nil, bodies[next_body])
end
