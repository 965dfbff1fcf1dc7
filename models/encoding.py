"""Combining the encodings of several reference images before projection."""
from __future__ import annotations

import torch

__all__ = ["COMBINE_METHODS", "combine_embeds", "combine_embeds_weighted", "check_embeds"]

COMBINE_METHODS = ("concat", "add", "subtract", "average", "norm average", "max", "min")


def check_embeds(embeds: torch.Tensor, name: str = "embeddings") -> torch.Tensor:
    """Raise ValueError for a non-tensor, an empty tensor, or NaN/Inf values; return `embeds`.

    A NaN here would otherwise only show up as a black image many steps later."""
    if not isinstance(embeds, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(embeds).__name__}")
    if embeds.numel() == 0:
        raise ValueError(f"{name} are empty (shape {tuple(embeds.shape)})")
    if embeds.is_floating_point() or embeds.is_complex():
        finite = torch.isfinite(embeds)
        if not bool(finite.all()):
            nans = int(torch.isnan(embeds).sum())
            infs = int((~finite).sum()) - nans
            raise ValueError(
                f"{name} contain {nans} NaN and {infs} infinite values (shape {tuple(embeds.shape)}); "
                "check the encoder and the model dtype (fp16 overflow is a common cause)"
            )
    return embeds


def combine_embeds(embeds: torch.Tensor, method: str) -> torch.Tensor:
    """Merge a batch of N encodings (dim 0) into one, keeping a leading batch dim of 1.

    concat returns the batch unchanged: the caller joins the N images' tokens along the
    sequence. Reductions run in float32 (fp16 sums and norms overflow easily) and the
    result is returned in the input dtype."""
    if method not in COMBINE_METHODS:
        raise ValueError(f"unknown combine method {method!r}; choose one of: {', '.join(COMBINE_METHODS)}")
    if not isinstance(embeds, torch.Tensor) or embeds.dim() == 0:
        raise ValueError("embeds must be a tensor with a leading image-batch dimension")
    n = embeds.shape[0]
    if n == 0:
        raise ValueError("cannot combine an empty batch of image embeddings (0 images)")
    if method == "concat":
        return embeds
    if method == "subtract" and n < 2:
        raise ValueError("'subtract' needs at least two images: the first minus the mean of the others")

    x = embeds if embeds.dtype == torch.float64 else embeds.float()
    if method == "add":
        out = x.sum(dim=0)
    elif method == "subtract":
        out = x[0] - x[1:].mean(dim=0)
    elif method == "average":
        out = x.mean(dim=0)
    elif method == "norm average":
        # The norm runs over the image batch, per feature, as in the established
        # implementation. Where every image is 0 that is 0/0; such features stay 0 instead of NaN.
        norm = torch.linalg.vector_norm(x, dim=0, keepdim=True)
        out = (x / norm.clamp_min(torch.finfo(x.dtype).tiny)).mean(dim=0)
    elif method == "max":
        out = x.amax(dim=0)
    else:  # "min"
        out = x.amin(dim=0)
    return out.unsqueeze(0).to(embeds.dtype)


def combine_embeds_weighted(embeds: torch.Tensor, weights, method: str) -> torch.Tensor:
    """combine_embeds with one weight per image; all weights 1 give combine_embeds (up to rounding).

    With x_i the N encodings and w_i their weights:
      concat        w_i * x_i, each image kept (as the established pack's encoder weight does)
      add           sum_i w_i x_i
      subtract      w_0 x_0 - sum_{i>0} w_i x_i / sum_{i>0} w_i
      average       sum_i w_i x_i / sum_i w_i
      norm average  sum_i w_i (x_i / ||x||) / sum_i w_i, the norm over the images per feature as unweighted
      max / min     elementwise max / min of w_i x_i
    Weights are finite; the weighted means (average, norm average, the subtracted mean) need
    weights >= 0 with a positive sum. Runs in float32, returns the input dtype."""
    if method not in COMBINE_METHODS:
        raise ValueError(f"unknown combine method {method!r}; choose one of: {', '.join(COMBINE_METHODS)}")
    if not isinstance(embeds, torch.Tensor) or embeds.dim() == 0 or embeds.shape[0] == 0:
        raise ValueError("embeds must be a tensor with a non-empty leading image-batch dimension")
    n = embeds.shape[0]
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != n:
        raise ValueError(f"{w.numel()} weights for {n} images; give one weight per image")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"image weights must be finite numbers, got {w.tolist()}")
    if method == "subtract" and n < 2:
        raise ValueError("'subtract' needs at least two images: the first minus the mean of the others")
    means = {"average": w, "norm average": w, "subtract": w[1:]}.get(method)
    if means is not None and (bool((means < 0).any()) or float(means.sum()) <= 0):
        raise ValueError(f"'{method}' takes a weighted mean: its weights must be >= 0 with a positive sum, "
                         f"got {means.tolist()}")

    x = embeds if embeds.dtype == torch.float64 else embeds.float()
    wx = w.to(device=x.device, dtype=x.dtype).reshape(n, *([1] * (x.dim() - 1)))
    if method == "concat":
        return (wx * x).to(embeds.dtype)
    if method == "add":
        out = (wx * x).sum(dim=0)
    elif method == "subtract":
        out = wx[0] * x[0] - (wx[1:] * x[1:]).sum(dim=0) / wx[1:].sum()
    elif method == "average":
        out = (wx * x).sum(dim=0) / wx.sum()
    elif method == "norm average":
        norm = torch.linalg.vector_norm(x, dim=0, keepdim=True)
        out = (wx * (x / norm.clamp_min(torch.finfo(x.dtype).tiny))).sum(dim=0) / wx.sum()
    elif method == "max":
        out = (wx * x).amax(dim=0)
    else:  # "min"
        out = (wx * x).amin(dim=0)
    return out.unsqueeze(0).to(embeds.dtype)
