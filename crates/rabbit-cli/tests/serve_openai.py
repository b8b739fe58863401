"""The real `openai` client against `rabbit serve` (run by tests/serve.rs).

argv: BASE_URL EXPECTED, where EXPECTED is what `rabbit generate --chat --max-new-tokens 10`
answers "Say something" alone; the server was started with --api-key k1 and serves "tiny".
"""
import sys

import openai

base, expected = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="k1", max_retries=0, timeout=120)
msgs = [{"role": "user", "content": "Say something"}]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what.splitlines()[0][:90]}")


models = client.models.list()
check([m.id for m in models.data] == ["tiny"], f"models.list: {models}")

r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
check(r.choices[0].message.content == expected, f"chat: {r.choices[0].message.content!r} != {expected!r}")
check(r.choices[0].message.role == "assistant", "chat role")
check(r.usage.completion_tokens == 10 and r.usage.total_tokens == r.usage.prompt_tokens + 10, f"usage {r.usage}")
check(r.choices[0].finish_reason == "length", f"finish_reason {r.choices[0].finish_reason}")

# max_completion_tokens, the newer name.
r = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=3, temperature=0)
check(r.usage.completion_tokens == 3, "max_completion_tokens")

# Streaming with include_usage: the text equals the whole answer; a last chunk carries usage.
chunks = list(client.chat.completions.create(
    model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
    stream_options={"include_usage": True}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(text == expected, f"stream text {text!r} != {expected!r}")
check(chunks[0].choices[0].delta.role == "assistant", "stream role first")
check(not chunks[-1].choices and chunks[-1].usage.completion_tokens == 10, f"include_usage: {chunks[-1]}")
check(all(c.usage is None for c in chunks[:-1]), "usage only in the last chunk")
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
check(finishes == ["length"], f"stream finish {finishes}")

# n > 1, sampled with a seed: several choices in one request, reproducible.
no_eos = {"ignore_eos": True}
a = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=1.0, seed=7, n=3, extra_body=no_eos)
b = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=1.0, seed=7, n=3, extra_body=no_eos)
check(len(a.choices) == 3 and [c.index for c in a.choices] == [0, 1, 2], "n=3 choices")
check([c.message.content for c in a.choices] == [c.message.content for c in b.choices], "seeded n=3 reproducible")
check(a.usage.completion_tokens == 18, f"n=3 usage {a.usage}")

# stop: the answer ends before the stop string, finish_reason stop.
check(len(expected) >= 6, f"the expected answer is long enough to cut: {expected!r}")
cut = expected[3:6]
r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stop=[cut])
want = expected[: expected.find(cut)]
check(r.choices[0].message.content == want and r.choices[0].finish_reason == "stop",
      f"stop {cut!r}: {r.choices[0].message.content!r} vs {want!r}, {r.choices[0].finish_reason}")
chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stop=cut, stream=True))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(text == want, f"streamed stop {text!r} vs {want!r}")

# logprobs: one entry per token, the greedy token the most likely, top lists sorted.
r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
content = r.choices[0].logprobs.content
check(len(content) == 5, f"logprobs entries {len(content)}")
for t in content:
    check(len(t.top_logprobs) == 3 and t.logprob <= 0, "logprob entry")
    check(abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6, "greedy token is the most likely")
    check(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob, "sorted")
# The tokens' bytes make up the answer exactly (byte-level BPE: partial characters included).
raw = b"".join(bytes(t.bytes) for t in content if not t.token.startswith("<|"))
check(raw.decode("utf-8", "replace") == r.choices[0].message.content, f"bytes {raw!r} vs {r.choices[0].message.content!r}")

# Completions: a list of prompts, n per prompt, logprobs, streaming.
c = client.completions.create(model="tiny", prompt=["Once upon", "a time"], max_tokens=4, temperature=0, n=2, logprobs=2, extra_body=no_eos)
check(len(c.choices) == 4 and c.choices[0].text == c.choices[1].text, "completions n=2 per prompt, greedy alike")
check(len(c.choices[0].logprobs.tokens) == 4 and len(c.choices[0].logprobs.top_logprobs[0]) == 2, "completions logprobs")
s = list(client.completions.create(model="tiny", prompt="Once upon", max_tokens=4, temperature=0, stream=True, extra_body=no_eos))
check("".join(x.choices[0].text for x in s if x.choices) == c.choices[0].text, "completions stream")
e = client.completions.create(model="tiny", prompt="Once upon", max_tokens=2, temperature=0, echo=True)
check(e.choices[0].text.startswith("Once upon"), "echo")

# Errors arrive as the client's exception types, naming the field.
try:
    client.chat.completions.create(model="tiny", messages=msgs, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    check(False, "tools refused")
except openai.BadRequestError as err:
    check(err.body["param"] == "tools", f"tools refused: {err.body}")
try:
    client.chat.completions.create(model="nope", messages=msgs)
    check(False, "unknown model refused")
except openai.NotFoundError as err:
    check(err.body["code"] == "model_not_found", f"unknown model: {err.body}")
try:
    openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    check(False, "wrong key refused")
except openai.AuthenticationError:
    check(True, "wrong key refused (401)")
print("all openai client checks passed")
