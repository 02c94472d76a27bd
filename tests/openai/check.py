"""vvlm's chat API through the official `openai` client (pinned in requirements.txt), as a new
user would call it. Run by crates/cli/tests/e2e_server.rs against a real `vvlm serve`:

    PYTHONPATH=target/openai-client python3 tests/openai/check.py BASE_URL KEY VIDEO

Exits non-zero with the failed check's message. Prints one line per check.
"""

import base64
import json
import sys
import urllib.request

import openai

base_url, key, video_path = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=120)
with open(video_path, "rb") as f:
    video_url = "data:video/mp4;base64," + base64.b64encode(f.read()).decode()


def messages(question):
    return [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": video_url}},
                {"type": "text", "text": question},
            ],
        }
    ]


def ok(name, cond, detail=""):
    if not cond:
        sys.exit(f"FAIL {name}: {detail}")
    print(f"ok   {name}")


QUESTION = "What is the capital of France? Answer in one sentence."
# vvlm's extensions go through extra_body, as with any OpenAI-compatible server.
EXTRA = {"budget_flops": "2T"}

# Models.
models = client.models.list()
ok("models.list", [m.id for m in models.data] == ["demo"], [m.id for m in models.data])
one = client.models.retrieve("demo")
ok("models.retrieve", one.id == "demo" and one.object == "model", one)
try:
    client.models.retrieve("no-such-model")
    ok("models.retrieve unknown", False, "no error")
except openai.NotFoundError as e:
    ok("models.retrieve unknown", e.status_code == 404, e)

# Text completions: the prompt as it is (no chat template): SmolLM2 completes the sentence.
c = client.completions.create(model="auto", prompt="The capital of France is", max_tokens=4,
                              logprobs=2, extra_body=EXTRA)
ok("completions: text", c.choices[0].text.startswith(" Paris"), repr(c.choices[0].text))
ok("completions: object and id", c.object == "text_completion" and c.id == "cmpl-" + c._request_id, c.id)
ok("completions: logprobs", len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens
   and all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs), c.choices[0].logprobs)
# lm-eval's log-likelihood request: echo with logprobs scores the prompt's own tokens; " Paris"
# (the model's answer above) is the greedy token where it stands, as lm-eval's is_greedy reads.
e = client.completions.create(model="auto", prompt="The capital of France is Paris", max_tokens=1,
                              echo=True, logprobs=1, temperature=0, extra_body=EXTRA)
elp = e.choices[0].logprobs
ok("completions: echo with logprobs",
   e.choices[0].text.startswith("The capital of France is Paris") and elp.token_logprobs[0] is None
   and elp.top_logprobs[0] is None and len(elp.tokens) == e.usage.prompt_tokens + e.usage.completion_tokens,
   elp)
i = elp.tokens.index(" Paris")
ok("completions: the prompt's greedy token", elp.token_logprobs[i] == max(elp.top_logprobs[i].values())
   and list(elp.top_logprobs[i]) == [" Paris"], (elp.tokens[i], elp.token_logprobs[i], elp.top_logprobs[i]))
streamed = "".join(ch.choices[0].text for ch in client.completions.create(
    model="auto", prompt="The capital of France is", max_tokens=4, stream=True, extra_body=EXTRA)
    if ch.choices)
ok("completions: streamed the same", streamed == c.choices[0].text, (streamed, c.choices[0].text))

# lm-eval's default requests (`tokenized_requests`): prompts as token ids, several in one
# request, the choices read in `index` order. The ids are llama.cpp's `llama-tokenize` on the
# same GGUF (an independent tokenizer): "The capital of France is", "... Germany is", and
# "... France is Paris" (" Berlin": 11452).
FRANCE, GERMANY = [504, 3575, 282, 4649, 314], [504, 3575, 282, 4521, 314]
PARIS = FRANCE + [7042]
texts = [client.completions.create(model="auto", prompt=p, max_tokens=4, temperature=0,
                                   extra_body=EXTRA)
         for p in ["The capital of France is", "The capital of Germany is"]]
b = client.completions.create(model="auto", prompt=[FRANCE, GERMANY], max_tokens=4, temperature=0,
                              extra_body=EXTRA)
got = [ch.text for ch in sorted(b.choices, key=lambda ch: ch.index)]
ok("completions: token ids, two prompts", got == [t.choices[0].text for t in texts]
   and b.usage.prompt_tokens == sum(t.usage.prompt_tokens for t in texts),
   (got, [t.choices[0].text for t in texts], b.usage))
parts = {}
for ch in client.completions.create(model="auto", prompt=[FRANCE, GERMANY], max_tokens=4,
                                    temperature=0, stream=True, extra_body=EXTRA):
    for c in ch.choices:
        parts[c.index] = parts.get(c.index, "") + c.text
ok("completions: two prompts streamed", [parts.get(0), parts.get(1)] == got, (parts, got))
sc = client.completions.create(model="auto", prompt=[PARIS, GERMANY + [11452]], max_tokens=1,
                              echo=True, logprobs=1, temperature=0, extra_body=EXTRA)
first = sorted(sc.choices, key=lambda ch: ch.index)[0].logprobs
ok("completions: scored token ids", first.tokens[:len(PARIS)] == elp.tokens[:len(PARIS)]
   and first.token_logprobs[:len(PARIS)] == elp.token_logprobs[:len(PARIS)],
   (first.tokens, elp.tokens))

# vLLM's /tokenize and /detokenize (outside the OpenAI client): the same ids as llama.cpp's.
def post(path, body):
    req = urllib.request.Request(base_url + path, data=json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + key,
                                          "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=60))


t = post("/tokenize", {"prompt": "The capital of France is Paris", "model": "demo"})
ok("tokenize: llama.cpp's ids", t["tokens"] == PARIS and t["count"] == len(PARIS), t)
# The GGUF's llama.context_length (llama.cpp's loader prints 8192), which plans keep within.
ok("tokenize: the trained context", t["max_model_len"] == 8192, t)
d = post("/detokenize", {"tokens": PARIS})
ok("detokenize: the text", d["prompt"] == "The capital of France is Paris", d)

# Non-streamed, with a video.
r = client.chat.completions.create(
    model="auto", messages=messages(QUESTION), max_tokens=12, seed=1, extra_body=EXTRA
)
text = r.choices[0].message.content
ok("chat: text", isinstance(text, str) and len(text) > 0, repr(text))
ok("chat: finish_reason", r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason)
ok("chat: usage", r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0, r.usage)
ok("chat: model is the planned checkpoint", r.model == "demo", r.model)
# The client reads the request's id from `x-request-id`; the completion is named after it.
ok("chat: request id", (r._request_id or "").startswith("req-") and r.id == "chatcmpl-" + r._request_id,
   (r._request_id, r.id))

# Streamed, with include_usage: the same text (greedy), usage in a final chunk.
chunks = list(
    client.chat.completions.create(
        model="auto",
        messages=messages(QUESTION),
        max_tokens=12,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXTRA,
    )
)
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
ok("stream: same text as non-streamed", streamed == text, f"{streamed!r} vs {text!r}")
ok("stream: usage chunk", chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, chunks[-1])
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
ok("stream: one finish_reason", len(finishes) == 1, finishes)

# Stop: a word the answer contains ends it before that word, finish_reason "stop".
words = text.split()
stop = next((w for w in words[1:] if len(w) >= 3), None)
ok("stop: a word to stop at", stop is not None, text)
r = client.chat.completions.create(
    model="auto", messages=messages(QUESTION), max_tokens=12, seed=1, stop=[stop], extra_body=EXTRA
)
got = r.choices[0].message.content
ok("stop: finish_reason", r.choices[0].finish_reason == "stop", r.choices[0].finish_reason)
ok("stop: text ends before the stop string", got == text[: text.index(stop)], f"{got!r} vs {text!r} at {stop!r}")

# Logprobs and n.
r = client.chat.completions.create(
    model="auto",
    messages=messages(QUESTION),
    max_tokens=4,
    logprobs=True,
    top_logprobs=3,
    n=2,
    temperature=0.7,
    extra_body=EXTRA,
)
ok("n: two choices", len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1], r.choices)
for c in r.choices:
    lp = c.logprobs.content
    ok("logprobs: one per token", len(lp) >= 1, lp)
    ok("logprobs: top 3, best first", all(len(t.top_logprobs) == 3 for t in lp), lp)
    ok("logprobs: <= 0", all(t.logprob <= 0 for t in lp), lp)
    ok(
        "logprobs: sorted",
        all(t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob for t in lp),
        lp,
    )

# Text alone.
r = client.chat.completions.create(
    model="auto", messages=[{"role": "user", "content": QUESTION}], max_tokens=8
)
ok("text-only chat", len(r.choices[0].message.content) > 0, r)

# Sampling controls as the client sends them: OpenAI's logit_bias and penalties as arguments,
# vLLM's top_k through extra_body. A +100 bias on one token makes every greedy token that one.
forced = client.chat.completions.create(
    model="auto", messages=[{"role": "user", "content": QUESTION}], max_tokens=4, logprobs=True,
    logit_bias={"1234": 100},
)
tokens = [t.token for t in forced.choices[0].logprobs.content]
ok("logit_bias: every token the biased one", len(tokens) == 4 and len(set(tokens)) == 1, tokens)
r = client.chat.completions.create(
    model="auto", messages=[{"role": "user", "content": QUESTION}], max_tokens=4,
    presence_penalty=0.5, frequency_penalty=0.5, temperature=1.0, seed=2, extra_body={"top_k": 5},
)
ok("penalties and top_k: answered", len(r.choices[0].message.content) > 0, r)

# JSON mode: the answer is one JSON object, whatever the model would have said.
r = client.chat.completions.create(
    model="auto", max_tokens=64, response_format={"type": "json_object"},
    messages=[{"role": "user", "content": "Describe Paris as JSON with keys name and country."}],
)
try:
    parsed = json.loads(r.choices[0].message.content)
except ValueError as e:
    parsed = e
ok("json_object: one JSON object", isinstance(parsed, dict) and r.choices[0].finish_reason == "stop",
   (r.choices[0].message.content, r.choices[0].finish_reason))

# Structured output: a JSON Schema (the subset vvlm enforces), as the client sends it.
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "country": {"type": "string"},
        "population_millions": {"anyOf": [{"type": "number"}, {"type": "null"}], "default": None},
        "capital": {"type": "boolean"},
    },
    "required": ["name", "country", "capital"],
    "additionalProperties": False,
}
r = client.chat.completions.create(
    model="auto", max_tokens=96,
    response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}},
    messages=[{"role": "user", "content": "Describe Paris."}],
)
try:
    doc = json.loads(r.choices[0].message.content)
except ValueError as e:
    doc = e
ok("json_schema: a document of the schema",
   isinstance(doc, dict) and set(doc) <= set(CITY["properties"]) and set(CITY["required"]) <= set(doc)
   and isinstance(doc["name"], str) and isinstance(doc["capital"], bool)
   and r.choices[0].finish_reason == "stop",
   (r.choices[0].message.content, r.choices[0].finish_reason))

# A forced tool call (as structured-extraction libraries make them): the arguments are a
# document of the function's parameters, plain and streamed.
TOOL = {"type": "function", "function": {"name": "describe_city", "description": "Record a city.",
                                         "parameters": CITY}}
FORCE = {"type": "function", "function": {"name": "describe_city"}}
r = client.chat.completions.create(
    model="auto", max_tokens=96, tools=[TOOL], tool_choice=FORCE,
    messages=[{"role": "user", "content": "Paris is the capital of France."}],
)
calls = r.choices[0].message.tool_calls or []
try:
    args = json.loads(calls[0].function.arguments)
except (ValueError, IndexError) as e:
    args = e
ok("tool call: the function and its arguments",
   len(calls) == 1 and calls[0].function.name == "describe_city" and calls[0].type == "function"
   and isinstance(args, dict) and set(CITY["required"]) <= set(args) and r.choices[0].message.content is None,
   r.choices[0].message)
streamed = ""
names = []
for c in client.chat.completions.create(
    model="auto", max_tokens=96, tools=[TOOL], tool_choice="required", stream=True,
    messages=[{"role": "user", "content": "Paris is the capital of France."}],
):
    for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
        if d.function and d.function.name:
            names.append(d.function.name)
        if d.function and d.function.arguments:
            streamed += d.function.arguments
try:
    sargs = json.loads(streamed)
except ValueError as e:
    sargs = e
ok("tool call: streamed arguments", names == ["describe_city"] and isinstance(sargs, dict)
   and set(CITY["required"]) <= set(sargs), (names, streamed))

# The call's result sent back as a `tool` message: the model answers in text.
r2 = client.chat.completions.create(
    model="auto", max_tokens=24, tools=[TOOL], tool_choice="none",
    messages=[{"role": "user", "content": "Paris is the capital of France."},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": calls[0].id, "type": "function",
                   "function": {"name": "describe_city", "arguments": calls[0].function.arguments}}]},
              {"role": "tool", "tool_call_id": calls[0].id, "content": "recorded"}],
)
ok("tool call: the result answered in text", isinstance(r2.choices[0].message.content, str)
   and len(r2.choices[0].message.content) > 0 and not r2.choices[0].message.tool_calls, r2.choices[0].message)

# A choice (vLLM's guided_choice, through extra_body): the answer is exactly one of them.
r = client.chat.completions.create(
    model="auto", messages=messages("Which city is the capital of France?"), max_tokens=16,
    extra_body={"guided_choice": ["Paris", "London", "I cannot tell"], **EXTRA},
)
ok("guided_choice: one of the strings", r.choices[0].message.content in ("Paris", "London", "I cannot tell"),
   r.choices[0].message.content)

# A conversation: the first answer sent back as the assistant's turn, then a follow-up about the
# same video; its prompt is the whole conversation, the video's part served from the cache.
follow_up = messages(QUESTION) + [
    {"role": "assistant", "content": text},
    {"role": "user", "content": "Say it again in French."},
]
r = client.chat.completions.create(
    model="auto", messages=follow_up, max_tokens=8, seed=1, extra_body=EXTRA
)
ok("conversation: answered", len(r.choices[0].message.content) > 0, r)
first = client.chat.completions.create(
    model="auto", messages=messages(QUESTION), max_tokens=1, seed=1, extra_body=EXTRA
)
ok("conversation: the prompt holds every turn", r.usage.prompt_tokens > first.usage.prompt_tokens + 5,
   (r.usage, first.usage))
ok("conversation: the video's KV from the first turn", r.usage.prompt_tokens_details.cached_tokens > 0, r.usage)

# The Batch API as the client drives it: a JSONL file of requests uploaded, a batch created over
# it, polled until it completes, and its output file read. Each line answers as the same request
# sent alone (greedy); a refused line lands in the error file with its 422.
import io
import time

lines = [
    {"custom_id": "france", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "auto", "messages": [{"role": "user", "content": QUESTION}],
              "max_tokens": 8, "temperature": 0, **EXTRA}},
    {"custom_id": "video", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "auto", "messages": messages("What is in the video?"),
              "max_tokens": 6, "temperature": 0, **EXTRA}},
    {"custom_id": "too-long", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}},
]
jsonl = "".join(json.dumps(line) + "\n" for line in lines).encode()
uploaded = client.files.create(file=("requests.jsonl", io.BytesIO(jsonl)), purpose="batch")
ok("files.create", uploaded.purpose == "batch" and uploaded.bytes == len(jsonl), uploaded)
ok("files.content of the input", client.files.content(uploaded.id).read() == jsonl)
batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"job": "check"})
ok("batches.create", batch.status == "in_progress" and batch.request_counts.total == 3, batch)
deadline = time.time() + 240
while batch.status in ("validating", "in_progress", "finalizing", "cancelling"):
    ok("batch finishes in time", time.time() < deadline, batch)
    time.sleep(0.5)
    batch = client.batches.retrieve(batch.id)
ok("batch completed", batch.status == "completed" and batch.completed_at is not None, batch)
ok("batch counts", (batch.request_counts.completed, batch.request_counts.failed) == (2, 1),
   batch.request_counts)
ok("batches.list", client.batches.list(limit=5).data[0].id == batch.id)
out = [json.loads(l) for l in client.files.content(batch.output_file_id).text.splitlines()]
ok("output in input order", [o["custom_id"] for o in out] == ["france", "video"], out)
for o, line in zip(out, lines):
    alone = client.chat.completions.create(**{k: v for k, v in line["body"].items() if k not in EXTRA},
                                           extra_body=EXTRA)
    got = o["response"]["body"]["choices"][0]["message"]["content"]
    ok(f"batch line {o['custom_id']} answers as alone", got == alone.choices[0].message.content,
       f"{got!r} vs {alone.choices[0].message.content!r}")
errs = [json.loads(l) for l in client.files.content(batch.error_file_id).text.splitlines()]
ok("error file", [(e["custom_id"], e["response"]["status_code"]) for e in errs] == [("too-long", 422)], errs)
cancelled = client.batches.cancel(client.batches.create(
    input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h").id)
ok("batches.cancel", cancelled.status in ("cancelling", "cancelled"), cancelled)
deleted = client.files.delete(batch.output_file_id)
ok("files.delete", deleted.deleted, deleted)

# Errors, each as its typed exception with OpenAI's fields.
def expect(name, exc, code, call):
    try:
        call()
    except exc as e:
        body = e.body if isinstance(e.body, dict) else {}
        ok(name, e.code == code or body.get("code") == code, f"code {e.code!r} body {e.body!r}")
        return e
    except Exception as e:  # noqa: BLE001
        sys.exit(f"FAIL {name}: {type(e).__name__}: {e}")
    sys.exit(f"FAIL {name}: no error")


bad = openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0)
expect("401 wrong key", openai.AuthenticationError, "unauthorized",
       lambda: bad.chat.completions.create(model="auto", messages=messages("hi")))
expect("404 unknown model", openai.NotFoundError, "model_not_found",
       lambda: client.chat.completions.create(model="nope", messages=messages("hi")))
e = expect("400 unsupported parameter", openai.BadRequestError, "unsupported_parameter",
           lambda: client.chat.completions.create(
               model="auto", messages=messages("hi"), modalities=["text", "audio"]))
ok("400 names the parameter", e.param == "modalities", e.param)
e = expect("422 invalid value", openai.UnprocessableEntityError, "validation_error",
           lambda: client.chat.completions.create(model="auto", messages=messages("hi"), max_tokens=100000))
ok("422 names the parameter", e.param == "max_tokens", e.param)
expect("403 file:// outside the allow-list", openai.PermissionDeniedError, "forbidden",
       lambda: client.chat.completions.create(
           model="auto",
           messages=[{"role": "user", "content": [
               {"type": "video_url", "video_url": {"url": "file:///etc/passwd"}},
               {"type": "text", "text": "hi"}]}]))
print("all checks passed")
