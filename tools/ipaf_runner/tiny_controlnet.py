"""A tiny random-weight SDXL ControlNet in the host's (LDM) key layout, for InstantID tests and workflows.

An SDXL ControlNet is a copy of the UNet's encoder half: time_embed, label_emb, input_blocks and
middle_block as in the UNet, plus input_hint_block (the control picture's stem: 3x3 convs
3->16->16->32->32->96->96->256->C, three of them with stride 2), zero_convs.N.0 (a 1x1 conv after every
input block) and middle_block_out.0. The host detects its config from these keys as it does a UNet's,
so the default sizes are those of the tiny SDXL checkpoint (tiny_models.sdxl_unet_state: 320 channels at
every level, depths 0/2/10) and 'Load ControlNet Model' loads the file. Smaller channel widths build the
same layout for host tests that construct the ControlNet from a known config.

The zero convolutions of a fresh ControlNet are zero; these are small random values instead, so the
ControlNet changes the result and a test can see what it reads."""
from __future__ import annotations

from pathlib import Path

from .tiny_models import _save, _UNetStateWriter

# the hint stem: (out channels, stride) of convs 0, 2, ..., 12; conv 14 maps 256 -> model channels
HINT_STEM = ((16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2))


def sdxl_controlnet_state(model_channels=320, channel_mult=(1, 1, 1), depths=(0, 2, 10), context_dim=2048,
                          adm_in_channels=2816, num_res_blocks=2, hint_channels=3, seed=7, prefix="",
                          zero_conv_scale=0.1) -> dict:
    """State dict of an SDXL-structured ControlNet (LDM keys; prefix '' or 'control_model.')."""
    C = model_channels
    T = 4 * C
    w = _UNetStateWriter(seed, prefix, T, context_dim)
    lin, conv, resblock, transformer = w.lin, w.conv, w.resblock, w.transformer

    lin("time_embed.0", T, C)
    lin("time_embed.2", T, T)
    lin("label_emb.0.0", T, adm_in_channels)
    lin("label_emb.0.2", T, T)

    cin = hint_channels
    for i, (cout, _) in enumerate(HINT_STEM):
        conv(f"input_hint_block.{2 * i}", cout, cin, 3)
        cin = cout
    conv(f"input_hint_block.{2 * len(HINT_STEM)}", C, cin, 3, scale=zero_conv_scale)

    conv("input_blocks.0.0", C, 4, 3)
    conv("zero_convs.0.0", C, C, 1, scale=zero_conv_scale)
    ch, idx = C, 1
    for level, (mult, depth) in enumerate(zip(channel_mult, depths)):
        for _ in range(num_res_blocks):
            out_c = C * mult
            resblock(f"input_blocks.{idx}.0", ch, out_c)
            ch = out_c
            if depth:
                transformer(f"input_blocks.{idx}.1", ch, depth)
            conv(f"zero_convs.{idx}.0", ch, ch, 1, scale=zero_conv_scale)
            idx += 1
        if level != len(depths) - 1:
            conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            conv(f"zero_convs.{idx}.0", ch, ch, 1, scale=zero_conv_scale)
            idx += 1
    resblock("middle_block.0", ch, ch)
    transformer("middle_block.1", ch, depths[-1])
    resblock("middle_block.2", ch, ch)
    conv("middle_block_out.0", ch, ch, 1, scale=zero_conv_scale)
    return w.sd


def write_tiny_sdxl_controlnet(path: Path, seed: int = 7, dtype: str = "float16", **sizes) -> Path:
    """Write sdxl_controlnet_state(**sizes) as .safetensors (the default sizes load in the host's
    'Load ControlNet Model' and fit the tiny SDXL checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(sdxl_controlnet_state(seed=seed, **sizes), path, dtype=dtype)
    return path


SC_SDXL_CONTROLNET = "ipaf_selfcheck_sdxl_identitynet.safetensors"
SC_INSTANTID_ADAPTER = "ipaf_selfcheck_sdxl_instantid.safetensors"


def make_instantid_adapter(path: Path, layer_dims=None, seed: int = 0) -> Path:
    """An InstantID face adapter (Plus resampler reading the 512-wide antelopev2 embedding into 16 tokens of
    width 2048; detected as the face-embedding resampler family) for the tiny SDXL checkpoint's 70 layers,
    with a small resampler (width 64, one head, one layer); float16 (184 MB: the K/V of 70 layers)."""
    import os

    import torch

    from .tiny_models import SC_SDXL_CONTEXT, SC_SDXL_LAYER_DIMS, _import_pack_module

    synthetic = _import_pack_module("models.synthetic")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part.safetensors")
    synthetic.save_synthetic_adapter(str(tmp), "plus", list(layer_dims or SC_SDXL_LAYER_DIMS), SC_SDXL_CONTEXT, 512,
                                     tokens=16, resampler_dim=64, resampler_heads=1, depth=1, seed=seed,
                                     dtype=torch.float16)
    os.replace(tmp, path)
    return path


def instantid_files(work_dir: Path, cache_dir: Path | None = None) -> dict:
    """{host folder: [files]} an InstantID run adds to tiny_models.sdxl_models(): the IdentityNet-shaped
    ControlNet (cached: 138M parameters, 276 MB in float16) and the InstantID adapter (made in work_dir).
    The face model pack comes from tiny_faces.write_pack (models/insightface/models/<name>/)."""
    from .tiny_models import SELFCHECK_MODELS_VERSION, _cached, default_cache_dir

    root = Path(cache_dir or default_cache_dir()) / f"selfcheck-models-v{SELFCHECK_MODELS_VERSION}"
    cn = _cached(root / "controlnet" / SC_SDXL_CONTROLNET,
                 "SDXL ControlNet (IdentityNet layout) for the tiny SDXL checkpoint", write_tiny_sdxl_controlnet)
    adapter = make_instantid_adapter(Path(work_dir) / "ipadapter" / SC_INSTANTID_ADAPTER)
    return {"controlnet": [cn], "ipadapter": [adapter]}
