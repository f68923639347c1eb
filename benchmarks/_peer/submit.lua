-- wrk script for benchmarks/compare.py: POST /api/v1/runs with a fixed ~100-byte body,
-- counting answers per status code (202 accepted, 503 PraisonAI's admission cap, ...).
-- At the end prints one line "COMPARE_RESULT {json}" that compare.py parses.
--   wrk -t1 -c16 -d6s --latency -s submit.lua http://127.0.0.1:PORT/api/v1/runs

wrk.method = "POST"
wrk.body = '{"prompt":"Summarise the quarterly report in five bullet points for the board."}'
wrk.headers["Content-Type"] = "application/json"

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   counts = {}
end

function response(status, headers, body)
   counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
   local agg = {}
   for _, t in ipairs(threads) do
      local c = t:get("counts")
      if c then
         for k, v in pairs(c) do agg[k] = (agg[k] or 0) + v end
      end
   end
   local parts = {}
   for k, v in pairs(agg) do table.insert(parts, string.format('"%d":%d', k, v)) end
   local e = summary.errors
   io.write(string.format(
      'COMPARE_RESULT {"duration_us":%d,"requests":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f},"statuses":{%s}}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean, table.concat(parts, ",")))
end
