-- wrk script for bench.compare's batch-settlement target: like wrk_paid.lua, but run with one
-- connection per thread, each thread paying on a channel of its own (a voucher is cumulative:
-- one channel's requests go one after another), from $BENCH_PAYMENTS.<thread number>.
-- A voucher is spent when its 200 comes back, not when request() is called: wrk calls the
-- first thread's request() once before the run to check the script (nothing sent).
local file = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CTYPE")

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("channel", threads)
end

function init(args)
  payments = {}
  for line in io.lines(os.getenv("BENCH_PAYMENTS") .. "." .. channel) do
    payments[#payments + 1] = line
  end
  answered = 0
end

function request()
  wrk.headers["PAYMENT-SIGNATURE"] = payments[answered + 1] or "exhausted"
  return wrk.format()
end

function response(status, headers, body)
  if status == 200 then
    answered = answered + 1
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%.1f,"p99_us":%.1f,"non2xx":%d,"errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
