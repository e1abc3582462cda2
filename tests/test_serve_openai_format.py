"""The streamed chunks' fast path writes exactly what the full encoder writes."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gitcli.serve import openai_format as oai

# ids and model names as a server may have them, and texts with everything JSON escapes:
# quotes, backslashes, control characters, line and paragraph separators, non-BMP characters
_names = st.text(min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(cid=_names, model=_names, created=st.integers(min_value=0, max_value=2**40), text=st.text(max_size=200))
def test_a_content_chunk_from_the_template_equals_the_full_encoding(cid, model, created, text):
    fast = oai.ContentChunks(cid, model, created)(text)
    assert fast == oai.chunk(cid, model, created, {"content": text})
    body = json.loads(fast.removeprefix("data: "))
    assert body["choices"][0]["delta"]["content"] == text and body["model"] == model


def test_a_model_name_holding_the_template_marker_does_not_confuse_it():
    chunks = oai.ContentChunks("chatcmpl-x", "model\x00name", 1)
    assert chunks("a \x00 b") == oai.chunk("chatcmpl-x", "model\x00name", 1, {"content": "a \x00 b"})
