"""The official `openai` client against `flux2 serve` (scripts/test-serve-clients.sh runs this):
generations (n, seed lists, streaming), edits with a reference image, and an error."""

import base64
import sys

import openai
from openai import OpenAI

url, reference = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{url}/v1", api_key="unused")

PNG = b"\x89PNG\r\n\x1a\n"


def png(b64):
    data = base64.b64decode(b64)
    assert data.startswith(PNG), data[:8]
    return data


r = client.images.generate(
    model="flux2", prompt="a red fox", n=2, size="32x32", response_format="b64_json", extra_body={"seed": [5, 9]}
)
assert len(r.data) == 2, r
for item in r.data:
    png(item.b64_json)
print("openai: images.generate n=2 ok")

with open(reference, "rb") as f:
    r = client.images.edit(model="flux2", image=[f], prompt="a red fox", extra_body={"seed": 3})
assert len(r.data) == 1
png(r.data[0].b64_json)
print("openai: images.edit with a reference image ok")

# flux2 also streams `flux2.progress` (one per step) and `flux2.done` events; clients pick the
# types they know, as OpenAI's examples do.
events = list(client.images.generate(model="flux2", prompt="a red fox", size="32x32", stream=True))
completed = [e for e in events if e.type == "image_generation.completed"]
progress = [e for e in events if e.type == "flux2.progress"]
assert len(completed) == 1 and len(progress) == 4, [e.type for e in events]
png(completed[0].b64_json)
print(f"openai: streaming ok ({len(progress)} progress events, 1 image)")

try:
    client.images.generate(model="flux2", prompt="x", size="17x32")
    raise SystemExit("a bad size was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "multiples of 16" in str(e), e
print("openai: a bad size is a BadRequestError ok")
