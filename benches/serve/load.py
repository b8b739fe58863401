"""Load generator for `rabbit serve`: C concurrent clients, each sending requests one after
another (closed loop), streamed, greedy, a fixed number of new tokens (ignore_eos).

Prints one JSON line: aggregate tokens/s (completion tokens of all clients over the wall time),
time to first token (median, max), per-request decode rate. Standard library only.

usage: load.py URL MODEL CLIENTS REQUESTS_PER_CLIENT MAX_TOKENS
"""
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

url, model = sys.argv[1], sys.argv[2]
clients, per_client, max_tokens = map(int, sys.argv[3:6])
u = urllib.parse.urlparse(url)
results = []
lock = threading.Lock()


def one(client, k):
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
    body = {
        "model": model,
        "prompt": f"Client {client} request {k}: a story about rabbits, numbers {client * 31 + k} and more text to read",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    first = None
    tokens = 0
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        v = json.loads(line[6:])
        if v["choices"] and v["choices"][0]["text"] and first is None:
            first = time.perf_counter() - start
        if v.get("usage"):
            tokens = v["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    conn.close()
    with lock:
        results.append((first or total, total, tokens))


def client(i):
    for k in range(per_client):
        one(i, k)


t0 = time.perf_counter()
threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.perf_counter() - t0
tokens = sum(r[2] for r in results)
ttft = [r[0] for r in results]
decode = [(r[2] - 1) / (r[1] - r[0]) for r in results if r[2] > 1 and r[1] > r[0]]
print(json.dumps({
    "clients": clients,
    "requests": len(results),
    "max_tokens": max_tokens,
    "completion_tokens": tokens,
    "wall_s": round(wall, 3),
    "aggregate_tokens_per_s": round(tokens / wall, 3),
    "ttft_median_s": round(statistics.median(ttft), 3),
    "ttft_max_s": round(max(ttft), 3),
    "per_request_tokens_per_s_median": round(statistics.median(decode), 3) if decode else None,
}))
