"""Plain-torch forwards of one DiT block, written from the public math, over a host block's weights.

Each function reads the parameters of a host block (Flux / Chroma double and single blocks, an MMDiT joint
block) and computes the block with its own torch code: layer norm, RMS norm, modulation, tanh-GELU, RoPE
and softmax attention are written out here. Nothing calls the host's forward code, so a test that compares
the two compares two implementations. No ComfyUI import at module level (the tests get the host through
their fixtures); this module only needs torch.

Image-prompt hooks (the places where the published adapters add their term; the README's "DiT adapters"
section names the reference code each fact comes from):

  ip_attn_out(qkv) -> (B, L, H*D)    added to the attention output rows before the output projection:
        Flux / Chroma double block: the image rows, before img_attn.proj           (InstantX Flux)
        Flux / Chroma single block: every row (text and image), before linear2       (InstantX Flux)
        SD3 joint block: the image (x) rows, before x_block.attn.proj (post_attention) (InstantX SD3.5)
  ip_residual(qkv) -> (B, L_img, hidden)   added to the image stream after the MLP residual, ungated
        Flux / Chroma double block only                                              (XLabs v1/v2)

  `qkv` is a QKV of the image stream (double / joint blocks) or of all rows (single blocks), each (B, H, L, D):
    q, k   after the block's own QK RMS norm, before RoPE (Flux / Chroma); after ln_q / ln_k (SD3, no RoPE)
    v      as projected
    q_raw, k_raw   before the block's QK norm (InstantX SD3.5 normalises them with its own norm_q / norm_k)

Terms for each family (xlabs_term, instantx_flux_term, instantx_sd3_term) build such hooks from K/V that a
test computes from the adapter's weights.
"""
from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Optional

import torch


class QKV(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_raw: torch.Tensor
    k_raw: torch.Tensor


Hook = Optional[Callable[[QKV], torch.Tensor]]


# --------------------------------------------------------------------------------------------------
# The primitives, written out
# --------------------------------------------------------------------------------------------------
def linear(x, module):
    """x W^T + b with the module's own parameters."""
    y = x @ module.weight.t()
    if getattr(module, "bias", None) is not None:
        y = y + module.bias
    return y


def layer_norm(x, eps=1e-6):
    """LayerNorm over the last dim without affine parameters (every LayerNorm in these blocks)."""
    mu = x.mean(dim=-1, keepdim=True)
    xc = x - mu
    var = (xc * xc).mean(dim=-1, keepdim=True)
    return xc / torch.sqrt(var + eps)


def rms_norm(x, weight=None, eps=1e-6):
    y = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def silu(x):
    return x * torch.sigmoid(x)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def split_heads(x, heads):
    """(B, L, H*D) -> (B, H, L, D)"""
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).transpose(1, 2)


def merge_heads(x):
    """(B, H, L, D) -> (B, L, H*D)"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v for (B, H, L, D) inputs; returns (B, L, H*D)."""
    w = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    w = w - w.amax(dim=-1, keepdim=True)
    w = torch.exp(w)
    w = w / w.sum(dim=-1, keepdim=True)
    return merge_heads(w @ v)


# --------------------------------------------------------------------------------------------------
# RoPE (Flux / Chroma): pe holds one 2x2 rotation per (row, channel pair): pe[..., i, j]
# --------------------------------------------------------------------------------------------------
def rope_pe(ids, axes_dim, theta):
    """Rotation matrices for position ids (B, L, n_axes): (B, 1, L, D/2, 2, 2), D = sum(axes_dim).
    Axis a rotates its axes_dim[a]/2 channel pairs by pos * theta^(-2j/axes_dim[a])."""
    mats = []
    for a, dim in enumerate(axes_dim):
        omega = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        ang = ids[..., a].to(torch.float64)[..., None] * omega  # (B, L, dim/2)
        c, s = torch.cos(ang), torch.sin(ang)
        mats.append(torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2))
    return torch.cat(mats, dim=-3).to(torch.float32).unsqueeze(1)


def rotate(x, pe):
    """Apply RoPE: each channel pair (x[2j], x[2j+1]) of row l is multiplied by pe[..., l, j, :, :]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    y0 = pe[..., 0, 0] * x0 + pe[..., 0, 1] * x1
    y1 = pe[..., 1, 0] * x0 + pe[..., 1, 1] * x1
    return torch.stack([y0, y1], dim=-1).flatten(-2).to(x.dtype)


def unrotate(q, pe):
    """Undo RoPE: multiply each pair by the transpose of its rotation (its inverse).
    q: (B, H, L, D) after RoPE (what an optimized_attention_override sees); pe: the block's `pe`
    (B or 1, 1, L, D/2, 2, 2). Returns the pre-RoPE q in q's dtype (computed in pe's dtype).
    For many calls per step, transpose pe once and keep it: that is most of the saving over `rotate`."""
    inv = pe.transpose(-1, -2)
    y = q.to(pe.dtype).reshape(*q.shape[:-1], -1, 1, 2)
    out = inv[..., 0] * y[..., 0]
    out.addcmul_(inv[..., 1], y[..., 1])
    return out.reshape(q.shape).to(q.dtype)


def renorm(x_normed, block_weight, new_weight):
    """RMS-norm weights are per channel: rms_norm(x, w_new) = rms_norm(x, w_block) * (w_new / w_block) exactly
    (both divide x by the same rms). So a query normed by the block (what the SD3 attention override sees) gives
    the query InstantX SD3.5 normalises with its own norm_q, without recomputing it (w_block without zeros)."""
    return x_normed * (new_weight / block_weight)


# --------------------------------------------------------------------------------------------------
# Flux / Chroma blocks
# --------------------------------------------------------------------------------------------------
def _is_chroma(vec):
    return isinstance(vec, (tuple, list)) or hasattr(vec, "gate")


def _mods(vec, lin, n):
    """Flux: silu(vec) -> Linear -> n chunks, each (B, 1, hidden)."""
    return linear(silu(vec[:, None, :]), lin).chunk(n, dim=-1)


def _stream_qkv(x, shift, scale, attn, heads):
    xm = layer_norm(x) * (1 + scale) + shift
    b, n, _ = x.shape
    qkv = linear(xm, attn.qkv).reshape(b, n, 3, heads, -1)
    q_raw, k_raw, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    q = rms_norm(q_raw, attn.norm.query_norm.scale)
    k = rms_norm(k_raw, attn.norm.key_norm.scale)
    return QKV(q, k, v, q_raw, k_raw)


def _mlp(x, seq):
    return linear(gelu_tanh(linear(x, seq[0])), seq[2])


@torch.no_grad()
def flux_double_block(block, img, txt, vec, pe, *, ip_attn_out: Hook = None, ip_residual: Hook = None):
    """One Flux double block (also Chroma's: then vec = ((img_mod1, img_mod2), (txt_mod1, txt_mod2)) with
    shift/scale/gate fields, as the host passes it). Text rows come first in the joint attention.
    Returns (img, txt); the inputs are not modified."""
    heads = block.num_heads
    if _is_chroma(vec):
        (im1, im2), (tm1, tm2) = vec
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = im1.shift, im1.scale, im1.gate, im2.shift, im2.scale, im2.gate
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = tm1.shift, tm1.scale, tm1.gate, tm2.shift, tm2.scale, tm2.gate
    else:
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = _mods(vec, block.img_mod.lin, 6)
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = _mods(vec, block.txt_mod.lin, 6)
    im = _stream_qkv(img, i_sh1, i_sc1, block.img_attn, heads)
    tx = _stream_qkv(txt, t_sh1, t_sc1, block.txt_attn, heads)
    q = rotate(torch.cat([tx.q, im.q], dim=2), pe)
    k = rotate(torch.cat([tx.k, im.k], dim=2), pe)
    v = torch.cat([tx.v, im.v], dim=2)
    out = attention(q, k, v)
    n_txt = txt.shape[1]
    txt_attn, img_attn = out[:, :n_txt], out[:, n_txt:]
    if ip_attn_out is not None:
        img_attn = img_attn + ip_attn_out(im)
    img = img + i_g1 * linear(img_attn, block.img_attn.proj)
    img = img + i_g2 * _mlp(layer_norm(img) * (1 + i_sc2) + i_sh2, block.img_mlp)
    if ip_residual is not None:
        img = img + ip_residual(im)
    txt = txt + t_g1 * linear(txt_attn, block.txt_attn.proj)
    txt = txt + t_g2 * _mlp(layer_norm(txt) * (1 + t_sc2) + t_sh2, block.txt_mlp)
    return img, txt


@torch.no_grad()
def flux_single_block(block, x, vec, pe, *, ip_attn_out: Hook = None):
    """One Flux single block over x = [text rows; image rows] (Chroma: vec has shift/scale/gate).
    Returns the new x; the input is not modified."""
    heads, hidden = block.num_heads, block.hidden_size
    if _is_chroma(vec):
        shift, scale, gate = vec.shift, vec.scale, vec.gate
    else:
        shift, scale, gate = _mods(vec, block.modulation.lin, 3)
    h = linear(layer_norm(x) * (1 + scale) + shift, block.linear1)
    qkv, mlp = h[..., :3 * hidden], h[..., 3 * hidden:]
    b, n, _ = x.shape
    qkv = qkv.reshape(b, n, 3, heads, -1)
    q_raw, k_raw, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    rows = QKV(rms_norm(q_raw, block.norm.query_norm.scale), rms_norm(k_raw, block.norm.key_norm.scale),
               v, q_raw, k_raw)
    out = attention(rotate(rows.q, pe), rotate(rows.k, pe), v)
    if ip_attn_out is not None:
        out = out + ip_attn_out(rows)
    return x + gate * linear(torch.cat([out, gelu_tanh(mlp)], dim=-1), block.linear2)


# --------------------------------------------------------------------------------------------------
# SD3 / SD3.5 joint block (MMDiT)
# --------------------------------------------------------------------------------------------------
def _qk_norm(x, norm):
    name = type(norm).__name__
    if name == "Identity":
        return x
    if name == "RMSNorm":
        return rms_norm(x, norm.weight, norm.eps)
    raise NotImplementedError(f"qk norm {name} (SD3.5 Large uses RMSNorm, SD3 Medium none)")


def _sd3_pre(db, x, c):
    if type(db.norm1).__name__ != "LayerNorm" or db.scale_mod_only:
        raise NotImplementedError("MMDiT variant with RMS norm1 or scale-only modulation")
    mods = linear(silu(c), db.adaLN_modulation[1]).chunk(2 if db.pre_only else 6, dim=1)
    shift, scale = mods[0], mods[1]
    xm = layer_norm(x) * (1 + scale[:, None]) + shift[:, None]
    b, n, _ = x.shape
    qkv = linear(xm, db.attn.qkv).reshape(b, n, 3, db.attn.num_heads, -1)
    q_raw, k_raw, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    return QKV(_qk_norm(q_raw, db.attn.ln_q), _qk_norm(k_raw, db.attn.ln_k), v, q_raw, k_raw), mods


def _sd3_post(db, x, attn, mods):
    _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    x = x + gate_msa[:, None] * linear(attn, db.attn.proj)
    h = layer_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return x + gate_mlp[:, None] * linear(gelu_tanh(linear(h, db.mlp.fc1)), db.mlp.fc2)


@torch.no_grad()
def sd3_joint_block(block, txt, img, c, *, ip_attn_out: Hook = None):
    """One MMDiT joint block: context (text) rows first in the joint attention, no RoPE.
    Returns (txt, img) like the host's block; txt is None for the last block (context pre_only)."""
    cb, xb = block.context_block, block.x_block
    if xb.x_block_self_attn:
        raise NotImplementedError("x_block_self_attn (SD3.5 Medium) is not covered by this reference")
    tx, t_mods = _sd3_pre(cb, txt, c)
    im, i_mods = _sd3_pre(xb, img, c)
    out = attention(torch.cat([tx.q, im.q], 2), torch.cat([tx.k, im.k], 2), torch.cat([tx.v, im.v], 2))
    n_txt = txt.shape[1]
    txt_attn, img_attn = out[:, :n_txt], out[:, n_txt:]
    if ip_attn_out is not None:
        img_attn = img_attn + ip_attn_out(im)
    txt_out = None if cb.pre_only else _sd3_post(cb, txt, txt_attn, t_mods)
    return txt_out, _sd3_post(xb, img, img_attn, i_mods)


# --------------------------------------------------------------------------------------------------
# Image-prompt terms of each family (K/V given per head: (B, H, T, D), computed by the test)
# --------------------------------------------------------------------------------------------------
def xlabs_term(k_ip, v_ip, scale=1.0) -> Callable[[QKV], torch.Tensor]:
    """XLabs v1/v2 (double blocks, as ip_residual): scale * Attn(q_img, K_ip, V_ip), q_img QK-normed before
    RoPE, K/V = the adapter's Linear (with bias) of the projected tokens, no norm, no gate, no projection."""
    return lambda qkv: scale * attention(qkv.q, k_ip, v_ip)


def instantx_flux_term(k_ip, v_ip, scale=1.0) -> Callable[[QKV], torch.Tensor]:
    """InstantX Flux (as ip_attn_out, double and single blocks): scale * Attn(q, K_ip, V_ip); K_ip already
    RMS-normed per head by the caller (no affine, eps 1e-5), V_ip as the original file leaves it."""
    return lambda qkv: scale * attention(qkv.q, k_ip, v_ip)


def instantx_sd3_term(norm_q_weight, norm_k_weight, k_ip, v_ip, scale=1.0, eps=1e-6):
    """InstantX SD3.5 (diffusers SD3IPAdapterJointAttnProcessor2_0, as ip_attn_out): the raw image-stream q
    and k normalised by the adapter's own norm_q / norm_k (RMS, affine, eps 1e-6), keys [k_img; K_ip],
    values [v_img; V_ip] (K_ip already through norm_ip, to_k_ip and norm_ip_k)."""
    def term(qkv):
        q = rms_norm(qkv.q_raw, norm_q_weight, eps)
        k = torch.cat([rms_norm(qkv.k_raw, norm_k_weight, eps), k_ip], dim=2)
        v = torch.cat([qkv.v, v_ip], dim=2)
        return scale * attention(q, k, v)
    return term


# --------------------------------------------------------------------------------------------------
# The references as dit replacements (whole-model comparisons in the real sampler)
# --------------------------------------------------------------------------------------------------
class ReferenceBlock:
    """A patches_replace["dit"] entry that computes its block with the reference above instead of calling
    original_block; hooks (ip_attn_out / ip_residual) as in the block functions."""

    def __init__(self, block, key, kind, ip_attn_out: Hook = None, ip_residual: Hook = None):
        self.block, self.key, self.kind = block, key, kind
        self.ip_attn_out, self.ip_residual = ip_attn_out, ip_residual

    def __deepcopy__(self, memo):  # model_options are deep-copied on clone(); the block is shared
        return self

    def __call__(self, args, extra):
        if self.kind == "sd3":
            txt, img = sd3_joint_block(self.block, args["txt"], args["img"], args["vec"], ip_attn_out=self.ip_attn_out)
            return {"txt": txt, "img": img}
        if self.key[0] == "double_block":
            img, txt = flux_double_block(self.block, args["img"], args["txt"], args["vec"], args["pe"],
                                         ip_attn_out=self.ip_attn_out, ip_residual=self.ip_residual)
            return {"img": img, "txt": txt}
        return {"img": flux_single_block(self.block, args["img"], args["vec"], args["pe"], ip_attn_out=self.ip_attn_out)}


def host_block(diffusion_model, key):
    kind, i = key
    if hasattr(diffusion_model, "joint_blocks"):
        return diffusion_model.joint_blocks[i]
    return (diffusion_model.double_blocks if kind == "double_block" else diffusion_model.single_blocks)[i]


def install_reference_blocks(patcher, kind, hooks=None):
    """Replace every block of `patcher` (a clone is modified in place) by its ReferenceBlock.
    hooks: {key: {"ip_attn_out": f, "ip_residual": g}}."""
    dm = patcher.get_model_object("diffusion_model")
    keys = ([("double_block", i) for i in range(len(dm.joint_blocks))] if kind == "sd3" else
            [("double_block", i) for i in range(len(dm.double_blocks))]
            + [("single_block", i) for i in range(len(dm.single_blocks))])
    for key in keys:
        ref = ReferenceBlock(host_block(dm, key), key, kind, **(hooks or {}).get(key, {}))
        patcher.set_model_patch_replace(ref, "dit", key[0], key[1])
    return keys


# --------------------------------------------------------------------------------------------------
# Cost of recovering the pre-RoPE query (a measurement, not a test): python tests/host/dit_reference.py
# --------------------------------------------------------------------------------------------------
def time_unrotate_vs_recompute(tokens=4096, txt_tokens=512, heads=24, head_dim=128, reps=3, threads=None):
    """Seconds per call, on this CPU, at Flux size: unrotate(q, pe) on the image rows of the q an override
    sees vs recomputing q_img from the block weights (layer norm + modulation + the q third of img_attn.qkv +
    RMS norm). Returns a dict."""
    if threads:
        torch.set_num_threads(threads)
    hidden = heads * head_dim
    g = torch.Generator().manual_seed(0)
    n = txt_tokens + tokens
    ids = torch.zeros(1, n, 3)
    side = int(math.isqrt(tokens))
    ids[0, txt_tokens:, 1] = torch.arange(tokens).div(side, rounding_mode="floor").float()
    ids[0, txt_tokens:, 2] = (torch.arange(tokens) % side).float()
    pe = rope_pe(ids, [16, 56, 56], 10000)
    q_rot = torch.randn(1, heads, n, head_dim, generator=g)
    img = torch.randn(1, tokens, hidden, generator=g)
    w_q = torch.randn(hidden, hidden, generator=g) / hidden ** 0.5
    b_q = torch.zeros(hidden)
    shift, scale = torch.randn(1, 1, hidden, generator=g), torch.randn(1, 1, hidden, generator=g)
    qn = torch.ones(head_dim)

    def do_unrotate():
        return unrotate(q_rot[:, :, txt_tokens:], pe[:, :, txt_tokens:])

    def do_recompute():
        xm = layer_norm(img) * (1 + scale) + shift
        return rms_norm(split_heads(xm @ w_q.t() + b_q, heads), qn)

    out = {}
    for name, fn in (("unrotate", do_unrotate), ("recompute", do_recompute)):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = (time.perf_counter() - t0) / reps
    out["threads"] = torch.get_num_threads()
    return out


if __name__ == "__main__":
    print(time_unrotate_vs_recompute())
