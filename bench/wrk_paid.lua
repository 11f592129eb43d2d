-- wrk script for bench.compare's paid target: like wrk_report.lua, and each request carries
-- the next unused payment from $BENCH_PAYMENTS (one PAYMENT-SIGNATURE value a line), starting
-- at line $BENCH_OFFSET + 1 (the bench skips what earlier runs spent: no replays).
local file = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CTYPE")

local payments = {}
for line in io.lines(os.getenv("BENCH_PAYMENTS")) do
  payments[#payments + 1] = line
end
local next_payment = tonumber(os.getenv("BENCH_OFFSET"))

function request()
  next_payment = next_payment + 1
  wrk.headers["PAYMENT-SIGNATURE"] = payments[next_payment] or "exhausted"
  return wrk.format()
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%.1f,"p99_us":%.1f,"non2xx":%d,"errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
