"""The official openai Python client against a running pdserve endpoint (argv[1] = base URL).

Exits non-zero with a message on the first mismatch."""

import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)

models = client.models.list()
model = models.data[0].id

chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Who made the light?"}],
    max_tokens=6,
    temperature=0,
)
assert chat.choices[0].message.role == "assistant", chat
assert chat.usage.completion_tokens == 6, chat.usage
assert chat.choices[0].finish_reason == "length", chat

pieces = []
usage = None
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Who made the light?"}],
    max_tokens=6,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage
assert "".join(pieces) == chat.choices[0].message.content, (pieces, chat)
assert usage is not None and usage.completion_tokens == 6, usage

completion = client.completions.create(model=model, prompt="And God said", max_tokens=4, temperature=0)
assert completion.usage.completion_tokens == 4, completion.usage
assert completion.choices[0].text, completion

try:
    client.chat.completions.create(
        model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404, e

print("openai client: ok")
