-- wrk script for scripts/bench_serving.py: POST the JSON body given in $BENCH_BODY to the URL's path.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
