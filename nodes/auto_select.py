"""Choosing model files by what they hold, never by their names: the CLIP vision / SigLIP file an adapter
needs (models/vision_files.py reads each header), and the adapter a preset of the unified loader means
(models/adapter_files.py reads each file's keys and shapes, then the adapter is checked against the model).

When several files fit, the order is: for encoders, a published tower whose name is the adapter's own
(e.g. CLIP ViT-H/14 for a ViT-H adapter) before other sizes of the same width, then the file names in
case-insensitive alphabetical order (the first is used). For presets, several fitting adapters are an error
naming them: Light and Standard, and Plus and Plus-Face, have the same structure, so their contents cannot
tell which is meant."""
from __future__ import annotations

from typing import Callable, Optional

from ..models.adapter_files import describe_adapter_file
from ..models.vision_files import describe_vision_file, encoder_fits, encoder_needed

AUTO_CLIP_VISION = "auto (by content)"
BY_PRESET = "by preset (content)"
CLIP_VISION_FOLDER = "clip_vision"


def _folder_text(folder: str) -> str:
    try:
        import folder_paths
        paths = folder_paths.get_folder_paths(folder)
    except Exception:  # outside the host (tests of this module alone)
        paths = []
    return f"models/{folder}" + (f" ({', '.join(paths)})" if paths else "")


def _host_listing(folder: str) -> tuple[list[str], Callable[[str], Optional[str]]]:
    import folder_paths

    return list(folder_paths.get_filename_list(folder)), lambda name: folder_paths.get_full_path(folder, name)


def pick_clip_vision(spec, names: list[str], full_path: Callable[[str], Optional[str]]) -> str:
    """The file of `names` (a clip_vision folder listing; full_path(name) -> path) that gives what the
    adapter reads. Raises ValueError naming what is needed and what each file there is."""
    fits, lines = [], []
    for name in names:
        path = full_path(name)
        vision = describe_vision_file(path) if path else None
        if vision is None:
            lines.append(f"  {name} -> not found on disk")
            continue
        why = encoder_fits(spec, vision)
        if why is None:
            fits.append((vision.name != spec.encoder_name, name.lower(), name))
        text = vision.describe()
        lines.append(f"  {name} -> {text}" + (f": {why}" if why and vision.is_encoder else ""))
    if fits:
        return min(fits)[2]
    where = _folder_text(CLIP_VISION_FOLDER)
    held = ("The folder holds:\n" + "\n".join(lines)) if lines else "The folder is empty."
    raise ValueError(f"no CLIP vision file fits: this adapter needs {encoder_needed(spec)}. Put that encoder in "
                     f"{where}, or choose a file explicitly. {held}")


def clip_vision_name(spec, choice: str) -> str:
    """`choice` when it names a file (an explicit choice always wins), else the clip_vision file picked by
    content for `spec`."""
    if choice and choice != AUTO_CLIP_VISION:
        return choice
    names, full_path = _host_listing(CLIP_VISION_FOLDER)
    return pick_clip_vision(spec, names, full_path)


def resolve_clip_vision(spec, choice: str):
    """The CLIP_VISION for `spec` (see clip_vision_name), loaded once while in use."""
    from .clip_vision import load_clip_vision

    return load_clip_vision(clip_vision_name(spec, choice))


# ---------------------------------------------------------------------------------------------------------
# Presets of the unified loader
# ---------------------------------------------------------------------------------------------------------
# preset -> (layout, encoder_input, encoder_width, SD1.5 only, what it is). As the established unified
# loader's presets: Light/Standard/vit-G read image_embeds (ViT-H: 1024, ViT-bigG: 1280), Plus and Plus-Face
# a resampler over ViT-H penultimate states (1280), Full-face an MLP over them.
PRESETS = {
    "light": ("base", "image_embeds", 1024, True, "a Light adapter (SD1.5, low strength)"),
    "standard": ("base", "image_embeds", 1024, False, "a Standard adapter (medium strength)"),
    "vit-G": ("base", "image_embeds", 1280, False, "a vit-G adapter (medium strength)"),
    "plus": ("plus", "penultimate", 1280, False, "a Plus adapter (high strength)"),
    "plus-face": ("plus", "penultimate", 1280, False, "a Plus-Face adapter (portraits)"),
    "full-face": ("full-face", "penultimate", 1280, True, "a Full-face adapter (SD1.5, portraits stronger)"),
}
_LAYOUT_WORDS = {"base": "a linear projection", "plus": "a resampler", "full-face": "a per-token MLP"}
_ENCODER_BY_INPUT = {("image_embeds", 1024): "CLIP ViT-H/14", ("image_embeds", 1280): "CLIP ViT-bigG/14",
                     ("penultimate", 1280): "CLIP ViT-H/14"}


def preset_wants(preset: str) -> str:
    layout, inp, width, sd15_only, what = PRESETS[preset]
    what_in = "image_embeds" if inp == "image_embeds" else "penultimate hidden states"
    return (f"{what}: {_LAYOUT_WORDS[layout]} of {_ENCODER_BY_INPUT[(inp, width)]} {what_in} ({width} wide)"
            + (", for SD1.5" if sd15_only else ""))


def preset_mismatch(preset: str, spec) -> Optional[str]:
    """None when the adapter's structure is the preset's; else a phrase."""
    layout, inp, width, _, _ = PRESETS[preset]
    if spec.architecture != "unet":
        return "made for a DiT (presets name SD1.5/SDXL adapters)"
    if spec.mip_gate:
        return "a MIP-Adapter (use it with the multi-reference nodes)"
    if spec.layout != layout or spec.encoder_input != inp or spec.encoder_width != width:
        return f"not {PRESETS[preset][4].split(' (')[0]}"
    return None


def _model_fit(spec, diffusion_model) -> Optional[str]:
    """None when the adapter fits the model (the apply node's own checks), else its message."""
    from .apply import check_adapter_fits
    from .dit_apply import bind_to_model, check_architecture, check_dit_fits
    from .unet_sites import unet_attn2_sites

    try:
        dit = check_architecture(spec, diffusion_model)
        if dit is not None:
            check_dit_fits(bind_to_model(spec, dit), dit)
        else:
            check_adapter_fits(spec, unet_attn2_sites(diffusion_model),
                               kolors_model=getattr(diffusion_model, "encoder_hid_proj", None) is not None)
    except ValueError as e:
        # the first sentence names the mismatch; the rest is advice for the apply node's user
        return str(e).removeprefix("this IP-Adapter ").removeprefix("this ").split(". ")[0]
    return None


def _is_sd15(diffusion_model) -> bool:
    from .unet_sites import unet_attn2_sites

    sites = unet_attn2_sites(diffusion_model)
    return len(sites) == 16 and {s.context_dim for s in sites} == {768}


def pick_adapter(preset: str, diffusion_model, names: list[str], full_path: Callable[[str], Optional[str]],
                 folder: str = "ipadapter") -> str:
    """The one file of `names` (the ipadapter folder) that is the preset's adapter by content and fits the
    model. On a DiT model the preset is not used: the one adapter that fits the model is. Raises ValueError
    naming what was looked for and what each file is."""
    from .dit_apply import is_dit

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    dit = is_dit(diffusion_model)
    if not dit and PRESETS[preset][3] and not _is_sd15(diffusion_model):
        raise ValueError(f"the preset '{preset}' exists for SD1.5 only (as in ComfyUI_IPAdapter_plus), and the "
                         "model is not SD1.5; choose 'standard', 'plus', 'plus-face' or 'vit-G'")
    wanted = "an IP-Adapter that fits this DiT model (on Flux, Chroma and SD3.5 the preset is not used)" if dit \
        else preset_wants(preset) + ", fitting the model"
    fits, lines = [], []
    for name in names:
        path = full_path(name)
        found = describe_adapter_file(path) if path else None
        if found is None or found.spec is None:
            lines.append(f"  {name} -> {found.problem if found else 'not found on disk'}")
            continue
        why = None if dit else preset_mismatch(preset, found.spec)
        if why is None:
            why = _model_fit(found.spec, diffusion_model)
        if why is None:
            fits.append(name)
        lines.append(f"  {name} -> {found.describe()}" + (f" [{why}]" if why else " [fits]"))
    held = ("The folder holds:\n" + "\n".join(lines)) if lines else "The folder is empty."
    where = _folder_text(folder)
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ValueError(f"no file in {where} is {wanted}. {held}")
    same = " (Light and Standard, and Plus and Plus-Face, have the same structure)" if not dit else ""
    raise ValueError(f"{len(fits)} files in {where} are {wanted}: {', '.join(fits)}. Their contents cannot tell "
                     f"which one is meant{same}; choose one with ipadapter_file. {held}")
