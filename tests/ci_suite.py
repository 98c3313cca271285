"""A small LLM test suite that ``tests/test_ci.py`` runs under ``greyfox ci``.

It talks to whatever ``OPENAI_BASE_URL`` and ``ANTHROPIC_BASE_URL`` name, as
a user's suite would: one chat completion, the same one again, a stream, and
one Anthropic message.  ``PROMPT`` changes the prompt of the first two and of
the message; a failed call is printed and counted, and the exit status is
``EXIT`` (default 0) so that ``greyfox ci``'s own verdict shows.
"""

import os
import sys

import anthropic
import openai

client = openai.OpenAI(max_retries=0)  # base URL and key from the environment, as greyfox ci sets them
claude = anthropic.Anthropic(max_retries=0)
prompt = os.environ.get("PROMPT", "Say hello")
failed = 0
calls = [
    dict(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]),
    dict(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]),
    dict(model="gpt-4o-mini", messages=[{"role": "user", "content": "Count to three"}], stream=True),
]
for body in calls:
    try:
        if body.get("stream"):
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body) if c.choices)
        else:
            text = client.chat.completions.create(**body).choices[0].message.content
        print("answer:", text, flush=True)
    except openai.APIStatusError as e:
        failed += 1
        print("failed:", e.status_code, e.body.get("type") if isinstance(e.body, dict) else e.body, flush=True)
try:
    message = claude.messages.create(model="claude-sonnet-4-5", max_tokens=64,
                                     messages=[{"role": "user", "content": prompt}])
    print("answer:", message.content[0].text, flush=True)
except anthropic.APIStatusError as e:
    failed += 1
    print("failed:", e.status_code, e.body, flush=True)
print(f"failed: {failed}", flush=True)
sys.exit(int(os.environ.get("EXIT", "0")))
