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
