"""Entity words of the multi-reference node: found in the prompt by their token ids (words of several
tokens too), encoded on their own, rows 1..count; clear errors otherwise. A stand-in CLIP with a
word-piece tokenizer keeps this independent of the host."""
from __future__ import annotations

import pytest
import torch

from ipadapter_fused.nodes.multi_ref import entity_rows, split_words

START, END = 49406, 49407
PIECES = {"cat": [10], "jacket": [20], "sunglasses": [30, 31], "a": [1], "wearing": [2], "red": [3], "": []}


class FakeClip:
    """tokenize: start token, each word's pieces, end token, padded with the end token to 8;
    encode_from_tokens: row r of the encoding = id * 0.001 + r (so rows can be traced)."""

    def tokenize(self, text):
        ids = [START] + [p for w in text.replace(",", " ").split() for p in PIECES[w]] + [END]
        ids += [END] * (8 - len(ids))
        return {"l": [[(t, 1.0) for t in ids]]}

    def encode_from_tokens(self, tokens):
        ids = torch.tensor([t for t, _ in tokens["l"][0]], dtype=torch.float32)
        return (ids * 0.001 + torch.arange(len(ids)))[None, :, None].expand(1, len(ids), 4).clone()


def test_rows_of_each_word_and_of_the_empty_prompt():
    clip = FakeClip()
    rows = entity_rows(clip, ["cat", "sunglasses"], "a cat wearing red sunglasses")
    (cat_pos, cat_neg), (sg_pos, sg_neg) = rows
    assert cat_pos.shape == (1, 4) and sg_pos.shape == (2, 4)
    assert cat_pos[:, 0].tolist() == pytest.approx([10 * 0.001 + 1])
    assert sg_pos[:, 0].tolist() == pytest.approx([30 * 0.001 + 1, 31 * 0.001 + 2])
    # negative rows: the same rows of the empty prompt's encoding (end tokens there)
    assert sg_neg[:, 0].tolist() == pytest.approx([END * 0.001 + 1, END * 0.001 + 2])


def test_a_word_not_in_the_prompt_is_named():
    with pytest.raises(ValueError, match="'jacket' is not in the prompt"):
        entity_rows(FakeClip(), ["cat", "jacket"], "a cat wearing sunglasses")


def test_split_words():
    assert split_words(" cat, jacket ,, ") == ["cat", "jacket"]
