"""Untrusted files in models/ipadapter, through the pack's loader node inside the host.

Every bad file must give an AdapterFormatError whose message starts with the file's name and
says what is wrong; a pickle's payload must never run; and the node must keep working for the
next (good) file, including a good file that replaces a bad one under the same name."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared bad-file makers
from untrusted_files import BAD_FILES, _save  # noqa: E402

CLIP = dict(image_size=224, patch_size=56, hidden_size=64, projection_dim=32)


@pytest.fixture
def folder(host, tmp_path, monkeypatch):
    """models/ipadapter of the host pointed at an empty temporary folder."""
    from ipadapter_fused.nodes.loaders import EXTENSIONS, FOLDER

    path = tmp_path / "ipadapter"
    path.mkdir()
    monkeypatch.setitem(host.folder_paths.folder_names_and_paths, FOLDER, ([str(path)], set(EXTENSIONS)))
    return path


@pytest.fixture
def sd15_state(tiny_sd15):
    """A good base adapter's flat state for the tiny SD1.5 UNet (its real layer widths)."""
    from ipadapter_fused.models import synthetic_adapter_state
    from ipadapter_fused.nodes.unet_sites import unet_attn2_sites

    sites = unet_attn2_sites(tiny_sd15().get_model_object("diffusion_model"))
    return synthetic_adapter_state("base", [s.width for s in sites], sites[0].context_dim, CLIP["projection_dim"])


def _load(name):
    from ipadapter_fused.nodes.ipadapter_nodes import IPAdapterFusedLoader

    return IPAdapterFusedLoader().load(name)["result"][0]


@pytest.fixture
def ctx(tmp_path, tiny_sd15, tiny_clip_vision):
    return {"marker": tmp_path / "code_ran",
            "unet_sd": tiny_sd15().model.diffusion_model.state_dict(),
            "clip_sd": tiny_clip_vision(**CLIP).get_sd()}


@pytest.mark.parametrize("make", BAD_FILES, ids=lambda f: f.__name__)
def test_bad_file_names_itself_and_the_problem(host, folder, sd15_state, ctx, make):
    from ipadapter_fused.models import AdapterFormatError

    name, words = make(folder, sd15_state, ctx)
    with pytest.raises(AdapterFormatError) as info:
        _load(name)
    msg = str(info.value)
    assert msg.startswith(f"{name}: "), msg
    for w in words:
        assert w in msg, (w, msg)
    assert not ctx["marker"].exists(), "the pickle's payload ran"
    for unsafe in ("weights_only=False", "add_safe_globals"):
        assert unsafe not in msg


def test_the_loader_keeps_working_after_bad_files(host, folder, sd15_state, ctx, tiny_sd15, tiny_clip_vision,
                                                  sampler, cond):
    """All bad files in a row, then a good one through load, apply and sampling; then a bad file
    replaced by a good one under the same name loads (failures are not cached)."""
    import torch

    from ipadapter_fused.models import AdapterFormatError, IPAdapterWeights
    from ipadapter_fused.nodes.ipadapter_nodes import IPAdapterFusedApply

    for make in BAD_FILES:
        name, _ = make(folder, sd15_state, ctx)
        with pytest.raises(AdapterFormatError):
            _load(name)
    assert not ctx["marker"].exists()

    _save(folder / "good.safetensors", sd15_state)
    adapter = _load("good.safetensors")
    expected = IPAdapterWeights.from_state(sd15_state)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(adapter.weights.state_dict()[key].float(), value, rtol=0, atol=0)

    model = tiny_sd15()
    cv = tiny_clip_vision(**CLIP)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    patched = IPAdapterFusedApply().apply(model, adapter, cv, image, 1.0, "linear", 0.0, 1.0, "concat", "V only",
                                          "patch")[0]
    pos, neg = cond("sd15", seed=1), cond("sd15", seed=2)
    out = sampler(patched, pos, neg, steps=1, latent_size=16)
    base = sampler(model, pos, neg, steps=1, latent_size=16)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-4, "the good adapter acts"

    # the bad file fixed in place: same name, new content
    stat = (folder / "nan.safetensors").stat()
    _save(folder / "nan.safetensors", sd15_state)
    os.utime(folder / "nan.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _load("nan.safetensors").spec == adapter.spec
