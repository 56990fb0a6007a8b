"""Publishing a chat prefix: the cut lands at the end of the last message's content."""

from __future__ import annotations

import pytest

from vllm_kvcdn.api.publisher import PublishError, chat_tokens


@pytest.mark.parametrize("last", ["end", "im", "start", "A long document about rivers.", "user"])
def test_chat_prefix_is_the_start_of_every_later_request(tokenizer, last):
    doc = [{"role": "system", "content": "You answer."}, {"role": "user", "content": last}]
    tokens = chat_tokens(tokenizer, doc)
    # Document words that also occur in the template ("end" in <|im_end|>) once made
    # the cut land inside the template's own text: such documents never hit.
    assert tokenizer.decode(tokens).endswith("user\n" + last)
    for later in (doc + [{"role": "user", "content": "A question?"}],
                  [doc[0], {"role": "user", "content": last + " A question?"}]):
        text = tokenizer.apply_chat_template(later, tokenize=False, add_generation_prompt=True)
        full = tokenizer.encode(text, add_special_tokens=False)  # as vLLM's chat route does
        assert full[: len(tokens)] == tokens


def test_chat_prefix_refuses_what_it_cannot_cut(tokenizer):
    with pytest.raises(PublishError, match="non-empty"):
        chat_tokens(tokenizer, [{"role": "user", "content": ""}])
    with pytest.raises(PublishError, match="list"):
        chat_tokens(tokenizer, [{"content": "no role"}])
