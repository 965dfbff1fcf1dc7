"""Adapter/model mismatch messages name the dimension that differs (issue 6, review gap).

Before the fix, an SD1.5 adapter made for a UNet of other channel widths was refused with
"made for SD1.5 (16 layers, context 768) but applied to an SD1.5 model (16 layers, context
768)": two identical descriptions, and nothing that says what differs."""
import pytest

from test_gaps_harness import CLIP, apply, image, make_adapter


def test_other_layer_widths_are_named(host, tiny_sd15, tiny_clip_vision, tmp_path):
    model = tiny_sd15()              # 32 channels: layer widths 32 / 64 / 128
    wider = tiny_sd15(model_channels=64)
    adapter, _, _ = make_adapter(host, wider, "base", tmp_path)
    with pytest.raises(ValueError) as err:
        apply(model, adapter, tiny_clip_vision(**CLIP), image(host.torch))
    msg = str(err.value)
    assert "layer widths differ" in msg
    assert "is 64 wide in the adapter but 32 in the model" in msg, msg
    assert "16 of 16 layers differ" in msg, msg


def test_other_context_width_is_named(host, tiny_sd15, tiny_clip_vision, tmp_path):
    """Same layer count, other context width: an SD2-like adapter on SD1.5."""
    model = tiny_sd15()
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    dims = [s.width for s in unet_attn2_sites(model.get_model_object("diffusion_model"))]
    import comfy.model_patcher

    from ipadapter_fused.models import load_adapter_file, save_synthetic_adapter
    from ipadapter_fused.nodes.loaders import LoadedAdapter

    path = tmp_path / "ctx1024.safetensors"
    save_synthetic_adapter(path, "base", dims, 1024, CLIP["projection_dim"])
    weights = load_adapter_file(path)
    adapter = LoadedAdapter(name=path.name, weights=weights, patcher=comfy.model_patcher.ModelPatcher(
        weights, load_device=host.torch.device("cpu"), offload_device=host.torch.device("cpu")))
    with pytest.raises(ValueError, match=r"context width 1024.*context width 768"):
        apply(model, adapter, tiny_clip_vision(**CLIP), image(host.torch))
