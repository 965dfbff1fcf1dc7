"""Combining several reference images' encodings, and the NaN/empty guard."""
import math

import pytest
import torch

from ipadapter_fused.models.encoding import COMBINE_METHODS, check_embeds, combine_embeds

# Three "images" with two features each, small enough to work out by hand.
E = torch.tensor([[1.0, -2.0],
                  [3.0, 0.0],
                  [-1.0, 4.0]])

HAND = {
    "add": [[3.0, 2.0]],
    "subtract": [[1.0 - (3.0 - 1.0) / 2, -2.0 - (0.0 + 4.0) / 2]],   # first minus mean of the rest
    "average": [[1.0, 2.0 / 3.0]],
    # per feature, each image divided by the L2 norm over the batch, then averaged
    "norm average": [[(1.0 + 3.0 - 1.0) / math.sqrt(11.0) / 3, (-2.0 + 0.0 + 4.0) / math.sqrt(20.0) / 3]],
    "max": [[3.0, 4.0]],
    "min": [[-1.0, -2.0]],
}


@pytest.mark.parametrize("method", list(HAND))
def test_methods_against_hand_values(method):
    out = combine_embeds(E, method)
    torch.testing.assert_close(out, torch.tensor(HAND[method]), atol=1e-6, rtol=0)
    assert out.shape == (1, 2)


def test_concat_keeps_every_image():
    assert combine_embeds(E, "concat") is E


@pytest.mark.parametrize("method", [m for m in COMBINE_METHODS if m != "concat"])
def test_token_shaped_inputs_keep_their_shape(method):
    x = torch.randn(4, 5, 6)
    out = combine_embeds(x, method)
    assert out.shape == (1, 5, 6)
    if method == "average":
        torch.testing.assert_close(out[0], x.mean(0))


def test_norm_average_all_zero_feature_is_zero_not_nan():
    x = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    out = combine_embeds(x, "norm average")
    assert torch.isfinite(out).all()
    assert out[0, 0] == 0.0


def test_half_precision_in_half_out_without_overflow():
    x = torch.full((4, 3), 300.0, dtype=torch.float16)  # 4 * 300^2 overflows fp16
    out = combine_embeds(x, "norm average")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.full((1, 3), 0.5), atol=1e-3, rtol=0)
    assert combine_embeds(x, "add").dtype == torch.float16


def test_single_image():
    one = E[:1]
    for method in ("add", "average", "max", "min"):
        torch.testing.assert_close(combine_embeds(one, method), one)
    with pytest.raises(ValueError, match="at least two images"):
        combine_embeds(one, "subtract")


def test_errors():
    with pytest.raises(ValueError, match="unknown combine method 'median'.*norm average"):
        combine_embeds(E, "median")
    with pytest.raises(ValueError, match="empty batch"):
        combine_embeds(torch.zeros(0, 4), "average")


def test_check_embeds():
    x = torch.randn(2, 3)
    assert check_embeds(x, "image embeddings") is x
    bad = x.clone()
    bad[0, 1] = float("nan")
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="image embeddings contain 1 NaN and 1 infinite"):
        check_embeds(bad, "image embeddings")
    with pytest.raises(ValueError, match="tokens are empty"):
        check_embeds(torch.zeros(0, 3), "tokens")
    with pytest.raises(ValueError, match="must be a tensor"):
        check_embeds([1.0], "tokens")
