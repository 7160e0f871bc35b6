-- wrk script: every request is a resumable download of its own (client, file) session.
-- Cycles through pre-minted client IDs (one per line in the file named by the second script
-- argument), each wrk thread starting at a different place so threads do not share sessions.
-- `Range: bytes=0-` declares "start from 0", so a session that already finished starts over
-- instead of answering 416: every response carries the whole file and is tracked.
-- Other servers in the comparison map /{id}/{file} to {file}, so they get the same requests.
-- Usage: wrk ... -s scripts/wrk-sessions.lua URL -- FILE IDS_FILE [norange]
-- With "norange", requests carry no Range: a session's first request downloads the file, and
-- once every session is complete each request is a repeated request for a finished file (416).
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  file = args[1]
  ids = {}
  for line in io.lines(args[2]) do
    if #line > 0 then ids[#ids + 1] = line end
  end
  i = (tid or 0) * 7919
  headers = {}
  if args[3] ~= "norange" then headers["Range"] = "bytes=0-" end
end

function request()
  i = i + 1
  return wrk.format("GET", "/" .. ids[(i % #ids) + 1] .. "/" .. file, headers)
end
