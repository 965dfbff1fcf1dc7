"""The adapter-versus-model check that runs before anything is patched."""
import pytest

from ipadapter_fused.models import AdapterSpec
from ipadapter_fused.nodes.apply import check_adapter_fits
from ipadapter_fused.nodes.schedules import Site


def sites(n, width, ctx):
    return [Site(("input", i, 0), "input", i, width, ctx, 8) for i in range(n)]


def spec(n, width, ctx, arch, layout="base", resampler_dim=None):
    return AdapterSpec(layout=layout, tokens=4, context_dim=ctx, encoder_width=1024, encoder_input="image_embeds",
                       encoder_name="CLIP ViT-H/14", num_layers=n, layer_dims=(width,) * n, arch_hint=arch,
                       resampler_dim=resampler_dim)


def test_matching_adapter_passes():
    check_adapter_fits(spec(16, 320, 768, "sd15"), sites(16, 320, 768))


@pytest.mark.parametrize("adapter,model,words", [
    (spec(70, 640, 2048, "sdxl"), sites(16, 320, 768), ["made for SDXL", "SD1.5 model", "ip-adapter_sd15"]),
    (spec(16, 320, 768, "sd15"), sites(70, 640, 2048), ["made for SD1.5", "SDXL model"]),
    (spec(16, 320, 768, "sd15"), sites(16, 320, 1024), ["made for SD1.5", "SD2 model"]),
    (spec(16, 320, 768, "sd15"), sites(16, 640, 768), ["made for SD1.5"]),
    # the dimension that differs is named; here only the widths differ (a UNet with other channels)
    (spec(16, 640, 768, "sd15"), sites(16, 320, 768), ["layer widths differ", "640 wide in the adapter but 320",
                                                       "16 of 16 layers differ"]),
    (spec(16, 320, 768, "sd15"), sites(16, 320, 1024), ["context width 768", "context width 1024"]),
    (spec(70, 640, 2048, "sdxl"), sites(16, 320, 768), ["70 cross-attention layers, the model has 16"]),
])
def test_mismatch_names_both_sides_and_the_dimension_that_differs(adapter, model, words):
    with pytest.raises(ValueError) as err:
        check_adapter_fits(adapter, model)
    for w in words:
        assert w in str(err.value)


def test_one_layer_of_other_width_is_named():
    model = sites(16, 320, 768)
    adapter = spec(16, 320, 768, "sd15")
    adapter = AdapterSpec(**{**adapter.__dict__, "layer_dims": (320,) * 5 + (321,) + (320,) * 10})
    with pytest.raises(ValueError, match=r"layer 5 \(input/5/0\) is 321 wide in the adapter but 320 in the model\."):
        check_adapter_fits(adapter, model)


def test_kolors_and_sdxl_are_told_apart():
    kolors = spec(70, 640, 2048, "sdxl", layout="plus", resampler_dim=2048)
    sdxl_plus = spec(70, 640, 2048, "sdxl", layout="plus", resampler_dim=1280)
    unet = sites(70, 640, 2048)
    with pytest.raises(ValueError, match="made for Kolors"):
        check_adapter_fits(kolors, unet)
    with pytest.raises(ValueError, match="Kolors UNet"):
        check_adapter_fits(sdxl_plus, unet, kolors_model=True)
    check_adapter_fits(kolors, unet, kolors_model=True)
    check_adapter_fits(sdxl_plus, unet)
