-- wrk script for scripts/bench_rollout.py: POST $BENCH_BODY with a random sticky key (X-User-Id) per request.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
math.randomseed(os.time())

request = function()
  wrk.headers["X-User-Id"] = "user-" .. math.random(1, 1000000)
  return wrk.format(nil, nil, nil, wrk.body)
end
