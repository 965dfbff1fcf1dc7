"""Several references merged per position (MIP-Adapter and its ungated/mask-routed variants) in the real
host: the pack's attn2 patch against the merge written out here on every layer of a tiny SDXL UNet, from
the checkpoint's raw tensors and the layer's own to_k (not the pack's code)."""
from __future__ import annotations

import pytest

import util

CLIP = dict(image_size=224, patch_size=56, hidden_size=64, projection_dim=32)


def _attn2(dm, key):
    block, idx, index = key
    container = {"input": dm.input_blocks, "output": dm.output_blocks}.get(block)
    module = dm.middle_block if block == "middle" else container[idx]
    transformers = [m for m in module.modules() if hasattr(m, "transformer_blocks")]
    blocks = [tb for st in transformers for tb in st.transformer_blocks]
    return blocks[index].attn2


def _adapter(host, model, tmp_path, gate=True, seed=0):
    import safetensors.torch

    from ipadapter_fused.models import load_adapter_file
    from ipadapter_fused.models.synthetic import synthetic_adapter_state
    from ipadapter_fused.nodes.loaders import LoadedAdapter
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    torch = host.torch
    sites = unet_attn2_sites(model.get_model_object("diffusion_model"))
    state = synthetic_adapter_state("base", [s.width for s in sites], sites[0].context_dim, CLIP["projection_dim"],
                                    seed=seed, dtype=torch.float32, mip_gate=gate)
    path = tmp_path / f"mip_{gate}_{sites[0].context_dim}.safetensors"
    safetensors.torch.save_file(state, str(path))
    weights = load_adapter_file(path).eval().requires_grad_(False)
    patcher = host.model_patcher.ModelPatcher(weights, load_device=torch.device("cpu"),
                                              offload_device=torch.device("cpu"))
    return LoadedAdapter(path.name, weights, patcher), state


def _images(torch, n=2):
    g = torch.Generator().manual_seed(11)
    return [torch.rand(2 if i == 0 else 1, 64, 64, 3, generator=g) for i in range(n)]


def _entities(torch, counts=(1, 2), width=2048):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(c, width, generator=g), torch.randn(c, width, generator=g)) for c in counts]


class MergeFormula:
    """O_text + sum_i w_i(l) T_i(l), written out:
      T_i   = weight * Attn(q, t_i W_k^T, t_i W_v^T), t_i the object's tokens (positive or negative rows)
      maps  = softmax over positions of (K_e q^T / sqrt(d)) per head, K_e = entity rows @ to_k^T,
              mean over heads, mean over the word's tokens
      w_i   = maps_i / sum_j maps_j  (attention routing), times g / mean(g), g = sigmoid(O_text W_gate^T)
              (MIP gate); or m_i / max(1, sum_j m_j) for mask routing."""

    def __init__(self, state, n, attn2, tokens, entities, weight, gate, masks=None):
        self.wk, self.wv = state[f"ip_adapter.{n}.to_k_ip.weight"], state[f"ip_adapter.{n}.to_v_ip.weight"]
        self.gate = state[f"ip_adapter.{n}.text_to_weight.weight"] if gate else None
        self.to_k = attn2.to_k.weight
        self.tokens, self.entities, self.weight, self.masks = tokens, entities, weight, masks

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra):
        import comfy.ldm.modules.attention as host_attention
        import torch
        import torch.nn.functional as F

        heads = extra["n_heads"]
        attn = lambda a, b, c: host_attention.optimized_attention(a, b, c, heads)  # noqa: E731
        o_text = attn(q, k, v)
        cou = list(extra["cond_or_uncond"])
        per = q.shape[0] // len(cou)
        rows = [1 if c == 1 else 0 for c in cou for _ in range(per)]
        terms = []
        for obj in self.tokens:
            t = torch.stack([obj[r] for r in rows])  # (B, T, C)
            terms.append(self.weight * attn(q, t @ self.wk.T, t @ self.wv.T))
        b, lq, c = q.shape
        d = c // heads
        if self.masks is not None:
            side = int(round(lq ** 0.5))
            m = F.interpolate(self.masks[:, None], size=(side, side), mode="bilinear").reshape(len(self.masks), 1, lq)
            w = m / m.sum(0, keepdim=True).clamp_min(1.0)
        else:
            maps = []
            for pos, neg in self.entities:
                ke = torch.stack([(pos if r == 0 else neg) for r in rows]) @ self.to_k.T  # (B, T, C)
                qh = q.reshape(b, lq, heads, d).transpose(1, 2)
                kh = ke.reshape(b, -1, heads, d).transpose(1, 2)
                probs = torch.softmax(kh @ qh.transpose(-1, -2) / d ** 0.5, dim=-1)  # over positions
                maps.append(probs.mean(1).mean(1))
            maps = torch.stack(maps)
            w = maps / maps.sum(0, keepdim=True)
            if self.gate is not None:
                g = torch.sigmoid(o_text @ self.gate.T)[..., 0]
                w = w * (g / g.mean(-1, keepdim=True))[None]
        return o_text + sum(w[i][..., None] * terms[i] for i in range(len(terms)))


def _object_tokens(adapter, cv, images):
    import torch

    from ipadapter_fused.nodes.encode import encode_images

    out = []
    for img in images:
        pos, neg = encode_images(cv, adapter.spec, img, None)
        out.append(torch.stack([adapter.weights.image_tokens(pos).mean(0), adapter.weights.image_tokens(neg[:1])[0]]))
    return out


@pytest.mark.parametrize("routing,gate", [("attention", True), ("attention", False), ("masks", False)],
                         ids=["mip-gate", "attention-routed", "mask-routed"])
def test_merge_matches_formula_on_every_layer(host, tiny_sdxl, tiny_clip_vision, sampler, cond, tmp_path, routing,
                                              gate):
    from ipadapter_fused.nodes.multi_ref_apply import apply_multi_reference
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    torch = host.torch
    model = tiny_sdxl()
    cv = tiny_clip_vision(**CLIP)
    adapter, state = _adapter(host, model, tmp_path, gate=gate)
    images = _images(torch)
    entities = _entities(torch)
    masks = None
    if routing == "masks":
        masks = [torch.zeros(1, 32, 32), torch.zeros(1, 32, 32)]
        masks[0][:, :, :20] = 1.0
        masks[1][:, :, 12:] = 0.7
    weight = 0.9
    patched = apply_multi_reference(model, adapter, cv, images, routing, entities=entities, masks=masks, weight=weight)

    dm = model.get_model_object("diffusion_model")
    sites = unet_attn2_sites(dm)
    tokens = _object_tokens(adapter, cv, images)
    reference = model.clone()
    mask_stack = None if masks is None else torch.cat(masks)
    for i, site in enumerate(sites):
        reference.set_model_attn2_replace(
            MergeFormula(state, 2 * i + 1, _attn2(dm, site.key), tokens, entities, weight, gate, mask_stack), *site.key)
    log = util.compare_layers(patched, reference, "sdxl", [s.key for s in sites])
    assert sorted({k for k, _, _ in log}) == sorted(s.key for s in sites), "every site is patched and called"
    util.assert_layers_match(log)
    got = sampler(patched, cond("sdxl", seed=1), cond("sdxl", seed=2), steps=2, latent_size=16)
    want = sampler(reference, cond("sdxl", seed=1), cond("sdxl", seed=2), steps=2, latent_size=16)
    plain = sampler(model, cond("sdxl", seed=1), cond("sdxl", seed=2), steps=2, latent_size=16)
    util.assert_latents_match(got, want)
    assert (want - plain).abs().max() > 0.05 * want.abs().max(), "the merged term must change the result"


def test_reference_errors(host, tiny_sdxl, tiny_sd15, tiny_clip_vision, tmp_path):
    from ipadapter_fused.nodes.multi_ref_apply import apply_multi_reference

    torch = host.torch
    cv = tiny_clip_vision(**CLIP)
    sdxl = tiny_sdxl()
    adapter, _ = _adapter(host, sdxl, tmp_path)
    images = _images(torch)
    with pytest.raises(ValueError, match="more references than entity names: 2 reference.*1 entity word"):
        apply_multi_reference(sdxl, adapter, cv, images, "attention", entities=_entities(torch, (1,)))
    with pytest.raises(ValueError, match="one mask per reference: 2 reference.*1 mask"):
        apply_multi_reference(sdxl, adapter, cv, images, "masks", masks=[torch.ones(1, 8, 8)])
    with pytest.raises(ValueError, match="MIP-Adapter, whose checkpoints are made for SDXL"):
        apply_multi_reference(tiny_sd15(), adapter, cv, images, "attention", entities=_entities(torch))
    with pytest.raises(ValueError, match="object_weights lists 3 factor"):
        apply_multi_reference(sdxl, adapter, cv, images, "attention", entities=_entities(torch),
                              object_weights=[1.0, 1.0, 1.0])
