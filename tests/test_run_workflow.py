"""The runner (tools/ipaf_runner) without a host: workflow conversion, overrides, the checks of the
runner's arguments before the host starts, error messages, the selfcheck's model layouts. Fast; runs
in the pack's own venv."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the shipped workflows, and the selfcheck (kept beside the runner, out of the template browser)
# The face workflows (their loaders, InstantID, ControlNet, ComfyUI-Kolors-MZ nodes) are converted against the real
# server's /object_info in tests/server/test_face_workflows.py, which also runs them; this file's trimmed static
# object_info covers the others.
FACE_WORKFLOWS = {"faceid_plusv2_sd15.json", "faceid_sdxl_references.json", "faceid_portrait_sd15.json",
                  "instantid_sdxl.json", "kolors_faceid.json"}
WORKFLOWS = sorted(p for p in (ROOT / "workflows").glob("*.json") if p.name not in FACE_WORKFLOWS) \
    + [ROOT / "tools" / "ipaf_runner" / "selfcheck_sd15.json"]
sys.path.insert(0, str(ROOT / "tools"))

from ipaf_runner import cli, convert, tiny_models  # noqa: E402
from ipaf_runner import run as runner_run  # noqa: E402
from ipaf_runner.errors import RunnerError, UsageError, WorkflowError  # noqa: E402

# A trimmed copy of a real host's /object_info (ComfyUI, Oct 2025) for the nodes the workflows use,
# plus this pack's nodes as the host reports them (tooltips and long combo lists cut).
OBJECT_INFO = {'CheckpointLoaderSimple': {'input': {'required': {'ckpt_name': [[]]}},
                            'input_order': {'required': ['ckpt_name']},
                            'output': ['MODEL', 'CLIP', 'VAE'],
                            'output_name': ['MODEL', 'CLIP', 'VAE'],
                            'name': 'CheckpointLoaderSimple',
                            'display_name': 'Load Checkpoint',
                            'category': 'loaders'},
 'CLIPVisionLoader': {'input': {'required': {'clip_name': [[]]}},
                      'input_order': {'required': ['clip_name']},
                      'output': ['CLIP_VISION'],
                      'output_name': ['CLIP_VISION'],
                      'name': 'CLIPVisionLoader',
                      'display_name': 'Load CLIP Vision',
                      'category': 'loaders'},
 'LoadImage': {'input': {'required': {'image': [[], {'image_upload': True}]}},
               'input_order': {'required': ['image']},
               'output': ['IMAGE', 'MASK'],
               'output_name': ['IMAGE', 'MASK'],
               'name': 'LoadImage',
               'display_name': 'Load Image',
               'category': 'image'},
 'CLIPTextEncode': {'input': {'required': {'text': ['STRING', {'multiline': True, 'dynamicPrompts': True}],
                                           'clip': ['CLIP']}},
                    'input_order': {'required': ['text', 'clip']},
                    'output': ['CONDITIONING'],
                    'output_name': ['CONDITIONING'],
                    'name': 'CLIPTextEncode',
                    'display_name': 'CLIP Text Encode (Prompt)',
                    'category': 'conditioning'},
 'EmptyLatentImage': {'input': {'required': {'width': ['INT', {'default': 512}],
                                             'height': ['INT', {'default': 512}],
                                             'batch_size': ['INT', {'default': 1}]}},
                      'input_order': {'required': ['width', 'height', 'batch_size']},
                      'output': ['LATENT'],
                      'output_name': ['LATENT'],
                      'name': 'EmptyLatentImage',
                      'display_name': 'Empty Latent Image',
                      'category': 'latent'},
 'KSampler': {'input': {'required': {'model': ['MODEL'],
                                     'seed': ['INT', {'default': 0, 'control_after_generate': True}],
                                     'steps': ['INT', {'default': 20}],
                                     'cfg': ['FLOAT', {'default': 8.0}],
                                     'sampler_name': [['euler',
                                                       'euler_cfg_pp',
                                                       'euler_ancestral',
                                                       'euler_ancestral_cfg_pp',
                                                       'heun',
                                                       'heunpp2',
                                                       'dpm_2',
                                                       'dpm_2_ancestral',
                                                       'lms',
                                                       'dpm_fast',
                                                       'dpm_adaptive',
                                                       'dpmpp_2s_ancestral',
                                                       'dpmpp_2s_ancestral_cfg_pp',
                                                       'dpmpp_sde',
                                                       'dpmpp_sde_gpu',
                                                       'dpmpp_2m',
                                                       'dpmpp_2m_cfg_pp',
                                                       'dpmpp_2m_sde',
                                                       'dpmpp_2m_sde_gpu',
                                                       'dpmpp_2m_sde_heun',
                                                       'dpmpp_2m_sde_heun_gpu',
                                                       'dpmpp_3m_sde',
                                                       'dpmpp_3m_sde_gpu',
                                                       'ddpm',
                                                       'lcm',
                                                       'ipndm',
                                                       'ipndm_v',
                                                       'deis',
                                                       'res_multistep',
                                                       'res_multistep_cfg_pp',
                                                       'res_multistep_ancestral',
                                                       'res_multistep_ancestral_cfg_pp',
                                                       'gradient_estimation',
                                                       'gradient_estimation_cfg_pp',
                                                       'er_sde',
                                                       'seeds_2',
                                                       'seeds_3',
                                                       'sa_solver',
                                                       'sa_solver_pece',
                                                       'ddim',
                                                       'uni_pc',
                                                       'uni_pc_bh2']],
                                     'scheduler': [['simple',
                                                    'sgm_uniform',
                                                    'karras',
                                                    'exponential',
                                                    'ddim_uniform',
                                                    'beta',
                                                    'normal',
                                                    'linear_quadratic',
                                                    'kl_optimal']],
                                     'positive': ['CONDITIONING'],
                                     'negative': ['CONDITIONING'],
                                     'latent_image': ['LATENT'],
                                     'denoise': ['FLOAT', {'default': 1.0}]}},
              'input_order': {'required': ['model',
                                           'seed',
                                           'steps',
                                           'cfg',
                                           'sampler_name',
                                           'scheduler',
                                           'positive',
                                           'negative',
                                           'latent_image',
                                           'denoise']},
              'output': ['LATENT'],
              'output_name': ['LATENT'],
              'name': 'KSampler',
              'display_name': 'KSampler',
              'category': 'sampling'},
 'KSamplerAdvanced': {'input': {'required': {'model': ['MODEL'],
                                             'add_noise': [['enable', 'disable']],
                                             'noise_seed': ['INT',
                                                            {'default': 0, 'control_after_generate': True}],
                                             'steps': ['INT', {'default': 20}],
                                             'cfg': ['FLOAT', {'default': 8.0}],
                                             'sampler_name': [['euler',
                                                               'euler_cfg_pp',
                                                               'euler_ancestral',
                                                               'euler_ancestral_cfg_pp',
                                                               'heun',
                                                               'heunpp2',
                                                               'dpm_2',
                                                               'dpm_2_ancestral',
                                                               'lms',
                                                               'dpm_fast',
                                                               'dpm_adaptive',
                                                               'dpmpp_2s_ancestral',
                                                               'dpmpp_2s_ancestral_cfg_pp',
                                                               'dpmpp_sde',
                                                               'dpmpp_sde_gpu',
                                                               'dpmpp_2m',
                                                               'dpmpp_2m_cfg_pp',
                                                               'dpmpp_2m_sde',
                                                               'dpmpp_2m_sde_gpu',
                                                               'dpmpp_2m_sde_heun',
                                                               'dpmpp_2m_sde_heun_gpu',
                                                               'dpmpp_3m_sde',
                                                               'dpmpp_3m_sde_gpu',
                                                               'ddpm',
                                                               'lcm',
                                                               'ipndm',
                                                               'ipndm_v',
                                                               'deis',
                                                               'res_multistep',
                                                               'res_multistep_cfg_pp',
                                                               'res_multistep_ancestral',
                                                               'res_multistep_ancestral_cfg_pp',
                                                               'gradient_estimation',
                                                               'gradient_estimation_cfg_pp',
                                                               'er_sde',
                                                               'seeds_2',
                                                               'seeds_3',
                                                               'sa_solver',
                                                               'sa_solver_pece',
                                                               'ddim',
                                                               'uni_pc',
                                                               'uni_pc_bh2']],
                                             'scheduler': [['simple',
                                                            'sgm_uniform',
                                                            'karras',
                                                            'exponential',
                                                            'ddim_uniform',
                                                            'beta',
                                                            'normal',
                                                            'linear_quadratic',
                                                            'kl_optimal']],
                                             'positive': ['CONDITIONING'],
                                             'negative': ['CONDITIONING'],
                                             'latent_image': ['LATENT'],
                                             'start_at_step': ['INT', {'default': 0}],
                                             'end_at_step': ['INT', {'default': 10000}],
                                             'return_with_leftover_noise': [['disable', 'enable']]}},
                      'input_order': {'required': ['model',
                                                   'add_noise',
                                                   'noise_seed',
                                                   'steps',
                                                   'cfg',
                                                   'sampler_name',
                                                   'scheduler',
                                                   'positive',
                                                   'negative',
                                                   'latent_image',
                                                   'start_at_step',
                                                   'end_at_step',
                                                   'return_with_leftover_noise']},
                      'output': ['LATENT'],
                      'output_name': ['LATENT'],
                      'name': 'KSamplerAdvanced',
                      'display_name': 'KSampler (Advanced)',
                      'category': 'sampling'},
 'VAEDecode': {'input': {'required': {'samples': ['LATENT'], 'vae': ['VAE']}},
               'input_order': {'required': ['samples', 'vae']},
               'output': ['IMAGE'],
               'output_name': ['IMAGE'],
               'name': 'VAEDecode',
               'display_name': 'VAE Decode',
               'category': 'latent'},
 'SaveImage': {'input': {'required': {'images': ['IMAGE'],
                                      'filename_prefix': ['STRING', {'default': 'ComfyUI'}]}},
               'input_order': {'required': ['images', 'filename_prefix']},
               'output': [],
               'output_name': [],
               'name': 'SaveImage',
               'display_name': 'Save Image',
               'category': 'image'},
 'VAELoader': {'input': {'required': {'vae_name': [[]]}},
               'input_order': {'required': ['vae_name']},
               'output': ['VAE'],
               'output_name': ['VAE'],
               'name': 'VAELoader',
               'display_name': 'Load VAE',
               'category': 'loaders'},
 'IPAdapterFusedLoader': {'input': {'required': {'ipadapter_file': [[]]}},
                          'input_order': {'required': ['ipadapter_file']},
                          'output': ['IPADAPTER_FUSED'],
                          'output_name': ['ipadapter'],
                          'name': 'IPAdapterFusedLoader',
                          'display_name': 'IPAdapter Loader (Fused)',
                          'category': 'ipadapter_fused'},
 'IPAdapterFusedApply': {'input': {'required': {'model': ['MODEL'],
                                                'ipadapter': ['IPADAPTER_FUSED'],
                                                'clip_vision': ['CLIP_VISION'],
                                                'image': ['IMAGE'],
                                                'weight': ['FLOAT', {'default': 1.0}],
                                                'weight_type': [['linear',
                                                                 'ease in',
                                                                 'ease out',
                                                                 'ease in-out',
                                                                 'reverse in-out',
                                                                 'weak input',
                                                                 'weak output',
                                                                 'weak middle',
                                                                 'strong middle',
                                                                 'style transfer',
                                                                 'composition',
                                                                 'strong style transfer',
                                                                 'style and composition',
                                                                 'style transfer precise',
                                                                 'composition precise',
                                                                 'custom'],
                                                                {'default': 'linear'}],
                                                'start_at': ['FLOAT', {'default': 0.0}],
                                                'end_at': ['FLOAT', {'default': 1.0}],
                                                'combine_embeds': [['concat',
                                                                    'add',
                                                                    'subtract',
                                                                    'average',
                                                                    'norm average',
                                                                    'max',
                                                                    'min'],
                                                                   {'default': 'concat'}],
                                                'embeds_scaling': [['V only',
                                                                    'K+V',
                                                                    'K+V w/ C penalty',
                                                                    'K+mean(V) w/ C penalty'],
                                                                   {'default': 'V only'}],
                                                'middle_block': [['patch',
                                                                  'skip (IPAdapter_plus compatible)'],
                                                                 {'default': 'patch'}]},
                                   'optional': {'image_negative': ['IMAGE'],
                                                'attn_mask': ['MASK'],
                                                'layer_weights': ['STRING',
                                                                  {'default': '', 'multiline': False}],
                                                'weight_composition': ['FLOAT', {'default': 1.0}]}},
                         'input_order': {'required': ['model',
                                                      'ipadapter',
                                                      'clip_vision',
                                                      'image',
                                                      'weight',
                                                      'weight_type',
                                                      'start_at',
                                                      'end_at',
                                                      'combine_embeds',
                                                      'embeds_scaling',
                                                      'middle_block'],
                                         'optional': ['image_negative',
                                                      'attn_mask',
                                                      'layer_weights',
                                                      'weight_composition']},
                         'output': ['MODEL'],
                         'output_name': ['MODEL'],
                         'name': 'IPAdapterFusedApply',
                         'display_name': 'Apply IPAdapter (Fused)',
                         'category': 'ipadapter_fused'},
 'IPAdapterFusedSimple': {'input': {'required': {'model': ['MODEL'],
                                                 'image': ['IMAGE'],
                                                 'ipadapter_file': [[]],
                                                 'clip_vision_file': [[]],
                                                 'weight': ['FLOAT', {'default': 1.0}],
                                                 'weight_type': [['linear',
                                                                  'ease in',
                                                                  'ease out',
                                                                  'ease in-out',
                                                                  'reverse in-out',
                                                                  'weak input',
                                                                  'weak output',
                                                                  'weak middle',
                                                                  'strong middle',
                                                                  'style transfer',
                                                                  'composition',
                                                                  'strong style transfer',
                                                                  'style and composition',
                                                                  'style transfer precise',
                                                                  'composition precise',
                                                                  'custom'],
                                                                 {'default': 'linear'}],
                                                 'start_at': ['FLOAT', {'default': 0.0}],
                                                 'end_at': ['FLOAT', {'default': 1.0}]}},
                          'input_order': {'required': ['model',
                                                       'image',
                                                       'ipadapter_file',
                                                       'clip_vision_file',
                                                       'weight',
                                                       'weight_type',
                                                       'start_at',
                                                       'end_at']},
                          'output': ['MODEL'],
                          'output_name': ['MODEL'],
                          'name': 'IPAdapterFusedSimple',
                          'display_name': 'IPAdapter (Fused, all-in-one)',
                          'category': 'ipadapter_fused'},
 'PreviewImage': {'input': {'required': {'images': ['IMAGE']}},
                  'input_order': {'required': ['images']},
                  'output': [],
                  'output_name': [],
                  'name': 'PreviewImage',
                  'display_name': 'Preview Image',
                  'category': 'image'}}

# The DiT workflows' nodes (same host, same trimming; file lists emptied).
OBJECT_INFO.update({
    'UNETLoader': {'input': {'required': {'unet_name': [[]],
                                          'weight_dtype': [['default', 'fp8_e4m3fn', 'fp8_e4m3fn_fast', 'fp8_e5m2']]}},
                   'input_order': {'required': ['unet_name', 'weight_dtype']},
                   'output': ['MODEL'], 'output_name': ['MODEL'], 'name': 'UNETLoader',
                   'display_name': 'Load Diffusion Model', 'category': 'advanced/loaders'},
    'DualCLIPLoader': {'input': {'required': {'clip_name1': [[]], 'clip_name2': [[]],
                                              'type': [['sdxl', 'sd3', 'flux', 'hunyuan_video', 'hidream', 'hunyuan_image']]},
                                 'optional': {'device': [['default', 'cpu'], {'advanced': True}]}},
                       'input_order': {'required': ['clip_name1', 'clip_name2', 'type'], 'optional': ['device']},
                       'output': ['CLIP'], 'output_name': ['CLIP'], 'name': 'DualCLIPLoader',
                       'display_name': 'DualCLIPLoader', 'category': 'advanced/loaders'},
    'TripleCLIPLoader': {'input': {'required': {'clip_name1': ['COMBO', {'multiselect': False, 'options': []}],
                                                'clip_name2': ['COMBO', {'multiselect': False, 'options': []}],
                                                'clip_name3': ['COMBO', {'multiselect': False, 'options': []}]}},
                         'input_order': {'required': ['clip_name1', 'clip_name2', 'clip_name3']},
                         'output': ['CLIP'], 'output_name': ['CLIP'], 'name': 'TripleCLIPLoader',
                         'display_name': 'TripleCLIPLoader', 'category': 'advanced/loaders'},
    'FluxGuidance': {'input': {'required': {'conditioning': ['CONDITIONING', {}],
                                            'guidance': ['FLOAT', {'default': 3.5, 'min': 0.0, 'max': 100.0, 'step': 0.1}]}},
                     'input_order': {'required': ['conditioning', 'guidance']},
                     'output': ['CONDITIONING'], 'output_name': ['CONDITIONING'], 'name': 'FluxGuidance',
                     'display_name': 'FluxGuidance', 'category': 'advanced/conditioning/flux'},
    'EmptySD3LatentImage': {'input': {'required': {'width': ['INT', {'default': 1024, 'min': 16, 'step': 16}],
                                                   'height': ['INT', {'default': 1024, 'min': 16, 'step': 16}],
                                                   'batch_size': ['INT', {'default': 1, 'min': 1}]}},
                            'input_order': {'required': ['width', 'height', 'batch_size']},
                            'output': ['LATENT'], 'output_name': ['LATENT'], 'name': 'EmptySD3LatentImage',
                            'display_name': 'EmptySD3LatentImage', 'category': 'latent/sd3'},
    'IPAdapterFusedClipVisionLoader': {'input': {'required': {'clip_name': [[]]}},
                                       'input_order': {'required': ['clip_name']},
                                       'output': ['CLIP_VISION'], 'output_name': ['clip_vision'],
                                       'name': 'IPAdapterFusedClipVisionLoader',
                                       'display_name': 'IPAdapter CLIP Vision Loader (Fused)',
                                       'category': 'ipadapter_fused'},
})

# The region and multi-reference workflows' nodes (issue 9).
sys.path.insert(0, str(ROOT / "tests"))  # --import-mode=importlib does not put tests/ on the path
from region_object_info import REGION_OBJECT_INFO  # noqa: E402
OBJECT_INFO.update(REGION_OBJECT_INFO)

VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def _required_inputs(info):
    return list((info["input"].get("required") or {}).keys())


def _check_prompt(prompt, workflow):
    """What the host's validation would check first: known classes, every required input present,
    links pointing at existing nodes and output slots of the right type."""
    for nid, node in prompt.items():
        info = OBJECT_INFO[node["class_type"]]
        for name in _required_inputs(info):
            assert name in node["inputs"], (nid, node["class_type"], name)
        for name, value in node["inputs"].items():
            spec = (info["input"].get("required") or {}).get(name) or (info["input"].get("optional") or {}).get(name)
            assert spec is not None, (nid, name)
            if isinstance(value, list):
                src, slot = value
                assert src in prompt, (nid, name, value)
                out_type = OBJECT_INFO[prompt[src]["class_type"]]["output"][slot]
                assert out_type == spec[0], (nid, name, out_type, spec[0])
            else:
                kind = spec[0]
                if kind == "INT":
                    assert isinstance(value, int) and not isinstance(value, bool), (nid, name, value)
                elif kind == "FLOAT":
                    assert isinstance(value, (int, float)) and not isinstance(value, bool), (nid, name, value)
                elif kind == "STRING":
                    assert isinstance(value, str), (nid, name, value)
                elif kind == "BOOLEAN":
                    assert isinstance(value, bool), (nid, name, value)
                elif isinstance(kind, list) and kind:  # combos whose options the subset lists
                    assert value in kind, (nid, name, value)
    real = [n for n in workflow["nodes"] if n["type"] not in VIRTUAL and n.get("mode", 0) not in (2, 4)]
    assert set(prompt) == {str(n["id"]) for n in real}


def test_face_workflows_are_the_server_tests_cases():
    server_test = (ROOT / "tests" / "server" / "test_face_workflows.py").read_text()
    for name in FACE_WORKFLOWS:
        assert (ROOT / "workflows" / name).is_file() and f'"{name}":' in server_test, name


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_shipped_workflows_convert(path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    assert workflow["last_node_id"] == max(n["id"] for n in workflow["nodes"])
    assert workflow["last_link_id"] == max(link[0] for link in workflow["links"])
    # every link is listed on both ends
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for lid, src, slot, dst, dslot, ltype in workflow["links"]:
        assert lid in (nodes[src]["outputs"][slot]["links"] or [])
        assert nodes[dst]["inputs"][dslot]["link"] == lid
    prompt = convert.workflow_to_prompt(workflow, OBJECT_INFO)
    _check_prompt(prompt, workflow)
    apply = [n for n in prompt.values() if n["class_type"] == "IPAdapterFusedApply"]
    scene = [n for n in prompt.values() if n["class_type"] in ("IPAdapterFusedRegion", "IPAdapterFusedMultiReference")]
    assert (apply or scene) and all(a["inputs"]["weight_type"] == "linear" and a["inputs"]["middle_block"] == "patch"
                                    for a in apply)
    ks = [n for n in prompt.values() if n["class_type"] == "KSampler"]
    assert ks and all(isinstance(k["inputs"]["steps"], int) and k["inputs"]["sampler_name"] for k in ks)


def test_basic_workflows_use_public_file_names():
    sd15 = convert.workflow_to_prompt(json.loads((ROOT / "workflows" / "sd15_basic.json").read_text()), OBJECT_INFO)
    sdxl = convert.workflow_to_prompt(json.loads((ROOT / "workflows" / "sdxl_basic.json").read_text()), OBJECT_INFO)

    def value(prompt, cls, name):
        return next(n["inputs"][name] for n in prompt.values() if n["class_type"] == cls)

    assert value(sd15, "IPAdapterFusedLoader", "ipadapter_file") == "ip-adapter_sd15.safetensors"
    assert value(sdxl, "IPAdapterFusedLoader", "ipadapter_file") == "ip-adapter_sdxl_vit-h.safetensors"
    for p in (sd15, sdxl):
        assert value(p, "CLIPVisionLoader", "clip_name") == "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
        assert value(p, "LoadImage", "image") == "example.png"
    assert value(sdxl, "EmptyLatentImage", "width") == 1024


def test_selfcheck_workflow_matches_the_runner():
    wf = json.loads(cli.SELFCHECK_WORKFLOW.read_text())
    prompt = convert.workflow_to_prompt(wf, OBJECT_INFO)
    names = {json.dumps(v) for n in prompt.values() for v in n["inputs"].values() if isinstance(v, str)}
    for name in (tiny_models.SC_CHECKPOINT, tiny_models.SC_CLIP_VISION, tiny_models.SC_ADAPTER, tiny_models.SC_IMAGE, tiny_models.SC_PREFIX_IP, tiny_models.SC_PREFIX_PLAIN):
        assert json.dumps(name) in names, name
    latent = next(n for n in prompt.values() if n["class_type"] == "EmptyLatentImage")["inputs"]
    assert latent["width"] <= 64 and latent["height"] <= 64
    samplers = [n for n in prompt.values() if n["class_type"] == "KSampler"]
    assert len(samplers) == 2 and all(s["inputs"]["steps"] <= 4 for s in samplers)
    models = sorted(prompt[s["inputs"]["model"][0]]["class_type"] for s in samplers)
    assert models == ["CheckpointLoaderSimple", "IPAdapterFusedApply"]
    # the Reroute in front of clip_vision is resolved to the loader
    apply = next(n for n in prompt.values() if n["class_type"] == "IPAdapterFusedApply")
    assert prompt[apply["inputs"]["clip_vision"][0]]["class_type"] == "CLIPVisionLoader"


# ---- widget mapping ------------------------------------------------------------------------------
def test_seed_control_value_is_skipped():
    info = OBJECT_INFO["KSampler"]
    got = convert.map_widget_values(info, [5, "randomize", 20, 7.5, "euler", "normal", 0.8])
    assert got == {"seed": 5, "steps": 20, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 0.8}
    # legacy saves stored a boolean there (the default template does)
    assert convert.map_widget_values(info, [5, True, 20, 8, "euler", "normal", 1])["steps"] == 20
    # and some tools save no control value at all
    assert convert.map_widget_values(info, [5, 20, 8, "euler", "normal", 1])["steps"] == 20


def test_noise_seed_without_flag_still_gets_its_control_value():
    info = copy.deepcopy(OBJECT_INFO["KSamplerAdvanced"])
    info["input"]["required"]["noise_seed"] = ["INT", {"default": 0}]  # older hosts: no flag
    vals = ["enable", 9, "fixed", 25, 6.0, "euler", "karras", 0, 10000, "disable"]
    got = convert.map_widget_values(info, vals)
    assert got["noise_seed"] == 9 and got["steps"] == 25 and got["return_with_leftover_noise"] == "disable"


def test_upload_widget_value_is_skipped():
    assert convert.map_widget_values(OBJECT_INFO["LoadImage"], ["pic.png", "image"]) == {"image": "pic.png"}
    assert convert.map_widget_values(OBJECT_INFO["LoadImage"], ["pic.png"]) == {"image": "pic.png"}


def test_optional_widgets_missing_from_an_older_save():
    vals = [0.7, "ease in", 0.1, 0.9, "add", "K+V", "skip (IPAdapter_plus compatible)"]
    got = convert.map_widget_values(OBJECT_INFO["IPAdapterFusedApply"], vals)
    assert got["weight"] == 0.7 and got["middle_block"] == "skip (IPAdapter_plus compatible)"
    assert "layer_weights" not in got


def test_dict_widget_values():
    got = convert.map_widget_values(OBJECT_INFO["EmptyLatentImage"], {"width": 64, "height": 32, "batch_size": 2, "x": 1})
    assert got == {"width": 64, "height": 32, "batch_size": 2}


def test_widget_inputs_follow_declaration_order_and_skip_sockets():
    names = [n for n, _ in convert.widget_inputs(OBJECT_INFO["IPAdapterFusedApply"])]
    assert names[:7] == ["weight", "weight_type", "start_at", "end_at", "combine_embeds", "embeds_scaling",
                         "middle_block"]
    assert "image_negative" not in names and "model" not in names
    assert convert.is_widget_input(["INT", {"forceInput": True}]) is False


# ---- graph features ------------------------------------------------------------------------------
def _node(nid, ntype, inputs=(), outputs=(), widgets=None, mode=0, **extra):
    n = {"id": nid, "type": ntype, "mode": mode, "order": nid,
         "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs], "properties": {}}
    if widgets is not None:
        n["widgets_values"] = widgets
    n.update(extra)
    return n


def _graph():
    """ckpt -> reroute -> KSampler.model; a muted and a bypassed node; a primitive driving seed."""
    nodes = [
        _node(1, "CheckpointLoaderSimple", outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]},
                                                    {"name": "CLIP", "type": "CLIP", "links": [2, 3]},
                                                    {"name": "VAE", "type": "VAE", "links": [9]}], widgets=["m.safetensors"]),
        _node(2, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}],
              outputs=[{"name": "", "type": "MODEL", "links": [4]}]),
        _node(3, "CLIPTextEncode", inputs=[{"name": "clip", "type": "CLIP", "link": 2}],
              outputs=[{"name": "CONDITIONING", "type": "CONDITIONING", "links": [5]}], widgets=["pos"]),
        _node(4, "CLIPTextEncode", inputs=[{"name": "clip", "type": "CLIP", "link": 3}],
              outputs=[{"name": "CONDITIONING", "type": "CONDITIONING", "links": [6]}], widgets=["neg"]),
        _node(5, "EmptyLatentImage", outputs=[{"name": "LATENT", "type": "LATENT", "links": [7]}], widgets=[64, 64, 1]),
        _node(6, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "links": [8],
                                            "widget": {"name": "seed"}}], widgets=[1234, "fixed"]),
        _node(7, "KSampler", inputs=[{"name": "model", "type": "MODEL", "link": 4},
                                     {"name": "positive", "type": "CONDITIONING", "link": 5},
                                     {"name": "negative", "type": "CONDITIONING", "link": 6},
                                     {"name": "latent_image", "type": "LATENT", "link": 7},
                                     {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 8}],
              outputs=[{"name": "LATENT", "type": "LATENT", "links": [10]}],
              widgets=[1234, "fixed", 3, 5.0, "euler", "normal", 1.0]),
        _node(8, "VAEDecode", inputs=[{"name": "samples", "type": "LATENT", "link": 10},
                                      {"name": "vae", "type": "VAE", "link": 9}],
              outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [11, 12]}]),
        _node(9, "SaveImage", inputs=[{"name": "images", "type": "IMAGE", "link": 11}], widgets=["out"]),
        _node(10, "SaveImage", inputs=[{"name": "images", "type": "IMAGE", "link": 12}], widgets=["muted"], mode=2),
        _node(11, "Note", widgets=["hello"]),
    ]
    links = [[1, 1, 0, 2, 0, "*"], [2, 1, 1, 3, 0, "CLIP"], [3, 1, 1, 4, 0, "CLIP"], [4, 2, 0, 7, 0, "MODEL"],
             [5, 3, 0, 7, 1, "CONDITIONING"], [6, 4, 0, 7, 2, "CONDITIONING"], [7, 5, 0, 7, 3, "LATENT"],
             [8, 6, 0, 7, 4, "INT"], [9, 1, 2, 8, 1, "VAE"], [10, 7, 0, 8, 0, "LATENT"],
             [11, 8, 0, 9, 0, "IMAGE"], [12, 8, 0, 10, 0, "IMAGE"]]
    return {"last_node_id": 11, "last_link_id": 12, "nodes": nodes, "links": links, "version": 0.4}


def test_reroute_primitive_note_and_muted_nodes():
    wf = _graph()
    prompt = convert.workflow_to_prompt(wf, OBJECT_INFO)
    assert set(prompt) == {"1", "3", "4", "5", "7", "8", "9"}
    ks = prompt["7"]["inputs"]
    assert ks["model"] == ["1", 0]          # through the Reroute
    assert ks["seed"] == 1234 and ks["steps"] == 3
    assert prompt["8"]["inputs"] == {"samples": ["7", 0], "vae": ["1", 2]}
    assert prompt["9"]["_meta"]["title"] == "Save Image"


def test_bypassed_node_passes_its_matching_input_through():
    wf = _graph()
    # insert a bypassed IPAdapterFusedApply between the checkpoint and the reroute
    wf["nodes"].append(_node(12, "IPAdapterFusedApply", mode=4,
                             inputs=[{"name": "model", "type": "MODEL", "link": 13},
                                     {"name": "ipadapter", "type": "IPADAPTER_FUSED", "link": None},
                                     {"name": "clip_vision", "type": "CLIP_VISION", "link": None},
                                     {"name": "image", "type": "IMAGE", "link": None}],
                             outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}],
                             widgets=[1.0, "linear", 0.0, 1.0, "concat", "V only", "patch", ""]))
    wf["links"][0] = [1, 12, 0, 2, 0, "MODEL"]
    wf["links"].append([13, 1, 0, 12, 0, "MODEL"])
    prompt = convert.workflow_to_prompt(wf, OBJECT_INFO)
    assert "12" not in prompt
    assert prompt["7"]["inputs"]["model"] == ["1", 0]


def test_schema_v1_link_objects():
    wf = _graph()
    wf["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link))
                   for link in wf["links"]]
    wf["version"] = 1
    assert convert.workflow_to_prompt(wf, OBJECT_INFO) == convert.workflow_to_prompt(_graph(), OBJECT_INFO)


def test_unknown_node_type_is_a_clear_error():
    wf = _graph()
    wf["nodes"].append(_node(20, "SomeMissingPackNode", widgets=[]))
    with pytest.raises(WorkflowError, match="SomeMissingPackNode"):
        convert.workflow_to_prompt(wf, OBJECT_INFO)


def test_api_prompt_passes_through_and_overrides():
    api = {"3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20}, "_meta": {"title": "Sampler"}},
           "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "a"}}}
    prompt = convert.workflow_to_prompt(api, OBJECT_INFO)
    assert prompt == api and prompt is not api
    convert.apply_overrides(prompt, ["Sampler.steps=4", "3.seed=99", "SaveImage.filename_prefix=b c"])
    assert prompt["3"]["inputs"] == {"seed": 99, "steps": 4}
    assert prompt["4"]["inputs"]["filename_prefix"] == "b c"
    with pytest.raises(RunnerError):
        convert.apply_overrides(prompt, ["nope.steps=1"])


def test_format_node_errors():
    payload = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
               "node_errors": {"4": {"class_type": "IPAdapterFusedLoader", "errors": [
                   {"message": "Value not in list", "details": "ipadapter_file: 'x' not in []",
                    "extra_info": {"input_name": "ipadapter_file"}}]}}}
    text = runner_run.format_node_errors(payload, {})
    assert "node #4 IPAdapterFusedLoader" in text and "ipadapter_file" in text


# ---- misc ----------------------------------------------------------------------------------------
def test_selfcheck_unet_layout_is_sd15():
    torch = pytest.importorskip("torch")
    sd = tiny_models.sd15_unet_state(model_channels=32, prefix="")
    to_k = sorted(k for k in sd if k.endswith("attn2.to_k.weight"))
    assert len(to_k) == 16
    assert all(tuple(sd[k].shape) == (32, 768) for k in to_k)
    assert tuple(sd["input_blocks.0.0.weight"].shape) == (32, 4, 3, 3)
    assert "label_emb.0.0.weight" not in sd and sd["input_blocks.1.1.proj_in.weight"].dim() == 4
    assert "middle_block.1.transformer_blocks.0.attn2.to_k.weight" in sd
    assert len([k for k in sd if k.startswith("output_blocks.") and k.endswith(".conv.weight")]) == 3
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_selfcheck_small_layouts():
    pytest.importorskip("torch")
    tae = tiny_models.taesd_state()
    assert tuple(tae["taesd_decoder.1.weight"].shape) == (64, 4, 3, 3)
    assert "taesd_encoder.14.bias" in tae and "taesd_decoder.19.bias" in tae
    cv = tiny_models.clip_vision_state(width=64, layers=23, intermediate=128, projection=32)
    assert "vision_model.encoder.layers.22.layer_norm1.weight" in cv  # the host's ViT-L detection key
    assert tuple(cv["vision_model.embeddings.position_embedding.weight"].shape) == (257, 64)
    te = tiny_models.clip_text_state(width=32, layers=2, intermediate=64, vocab=100)
    assert tuple(te["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape) == (100, 32)


# ---- the runner's arguments, checked before the host starts ----------------------------------------
def _sd15_workflow():
    return json.loads((ROOT / "workflows" / "sd15_basic.json").read_text())


def test_set_with_a_misspelt_input_names_the_inputs_the_node_has():
    prompt = convert.workflow_to_prompt(_sd15_workflow(), OBJECT_INFO)
    with pytest.raises(UsageError, match=r"node #5 IPAdapterFusedApply has no input 'wieght'.*\bweight\b"):
        convert.apply_overrides(prompt, ["5.wieght=0.5"], OBJECT_INFO)
    assert prompt["5"]["inputs"]["weight"] == 1.0 and "wieght" not in prompt["5"]["inputs"]
    convert.apply_overrides(prompt, ["5.weight=0.5", "KSampler.steps=4"], OBJECT_INFO)
    assert prompt["5"]["inputs"]["weight"] == 0.5 and prompt["9"]["inputs"]["steps"] == 4


def test_set_on_a_node_id_the_workflow_lacks_fails_before_start():
    nodes = convert.sent_nodes(_sd15_workflow())
    with pytest.raises(UsageError, match="no node #55"):
        convert.check_override_nodes(nodes, ["55.weight=1"])
    with pytest.raises(UsageError, match="expected NODE.INPUT=VALUE"):
        convert.check_override_nodes(nodes, ["weight=1"])
    # titles and class types pass; display names are only known to the host
    convert.check_override_nodes(nodes, ["Reference image.image=x.png", "KSampler.steps=2", "Load Image.image=y"])


def test_image_for_a_node_that_does_not_exist_or_loads_no_image(tmp_path):
    pic = tmp_path / "ref.png"
    pic.write_bytes(b"png")
    nodes = convert.sent_nodes(_sd15_workflow())
    with pytest.raises(UsageError, match=r"no node '99'.*#3 LoadImage"):
        convert.plan_images(nodes, [f"99={pic}"])
    with pytest.raises(UsageError, match=r"#6 CLIPTextEncode loads no image"):
        convert.plan_images(nodes, [f"6={pic}"])
    assert convert.plan_images(nodes, [f"3={pic}"]) == {"3": pic}
    assert convert.plan_images(nodes, [f"Reference image={pic}"]) == {"3": pic}
    assert convert.plan_images(nodes, [str(pic)]) == {"3": pic}


def test_no_image_is_an_error_unless_the_example_picture_is_asked_for(tmp_path):
    nodes = convert.sent_nodes(_sd15_workflow())
    with pytest.raises(UsageError, match=r"#3 LoadImage has no picture.*--example-image.*'example.png'"):
        convert.plan_images(nodes, [])
    with pytest.raises(UsageError, match="'example.png', which is not in"):
        convert.plan_images(nodes, [], example_folder=tmp_path)
    (tmp_path / "example.png").write_bytes(b"png")
    assert convert.plan_images(nodes, [], example_folder=tmp_path) == {"3": tmp_path / "example.png"}


def test_missing_image_file_is_reported(tmp_path):
    nodes = convert.sent_nodes(_sd15_workflow())
    with pytest.raises(UsageError, match="no such file"):
        convert.plan_images(nodes, [str(tmp_path / "nope.png")])
    with pytest.raises(UsageError, match="no such file"):
        convert.plan_images(nodes, [f"3={tmp_path / 'nope.png'}"])


def test_two_pictures_for_the_same_loaders_are_an_error(tmp_path):
    """`--image a.png --image b.png` used to feed b.png to every loader and drop a.png without a word
    (a user of a two-picture workflow expects one picture per loader)."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"png")
    b.write_bytes(b"png")
    nodes = convert.sent_nodes(_sd15_workflow())
    with pytest.raises(UsageError, match=r"--image given twice for every image loader.*a\.png.*b\.png.*--image 3=PATH"):
        convert.plan_images(nodes, [str(a), str(b)])
    with pytest.raises(UsageError, match=r"two pictures for #3 LoadImage.*a\.png.*b\.png"):
        convert.plan_images(nodes, [f"3={a}", f"Reference image={b}"])
    # one default and one per node: the node's own wins (documented), the same file twice is no conflict
    assert convert.plan_images(nodes, [str(a), f"3={b}"]) == {"3": b}
    assert convert.plan_images(nodes, [str(a), str(a)]) == {"3": a}


def test_a_file_that_is_not_a_picture_is_reported_before_start(tmp_path, monkeypatch, capsys):
    """A --image file the host cannot open used to surface only after the host had started and the
    prompt had run up to LoadImage."""
    pytest.importorskip("PIL")
    from PIL import Image

    fake = tmp_path / "ComfyUI"
    (fake / "input").mkdir(parents=True)
    (fake / "main.py").write_text("raise SystemExit('the host must not start')\n")
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    monkeypatch.setattr(cli.ComfyServer, "start", lambda self: (_ for _ in ()).throw(AssertionError("started")))
    code = cli.main(["--comfyui", str(fake), str(ROOT / "workflows" / "sd15_basic.json"), "--image", str(notes)])
    out = capsys.readouterr().out
    assert code == 1 and "notes.png is not a picture" in out and "#3 LoadImage" in out, out

    real = tmp_path / "real.png"
    Image.new("RGB", (32, 24), (200, 10, 10)).save(real)
    images = cli.prepare(convert.load_workflow(ROOT / "workflows" / "sd15_basic.json"),
                         cli.build_parser().parse_args(["x.json", "--image", str(real)]), fake)
    assert images == {"3": real}


@pytest.mark.parametrize("extra, message", [
    (["--image", "MISSING"], "no such file"),
    (["--image", "99=PIC"], "no node '99'"),
    ([], "has no picture"),
    (["--image", "PIC", "--set", "55.weight=1"], "no node #55"),
])
def test_cli_reports_argument_mistakes_without_starting_the_host(tmp_path, monkeypatch, capsys, extra, message):
    fake = tmp_path / "ComfyUI"
    (fake / "input").mkdir(parents=True)
    (fake / "main.py").write_text("raise SystemExit('the host must not start')\n")
    pic = tmp_path / "ref.png"
    pic.write_bytes(b"png")
    extra = [str(pic) if a == "PIC" else f"99={pic}" if a == "99=PIC" else str(tmp_path / "missing.png")
             if a == "MISSING" else a for a in extra]

    def no_start(self):
        raise AssertionError("the host was started")

    monkeypatch.setattr(cli.ComfyServer, "start", no_start)
    code = cli.main(["--comfyui", str(fake), str(ROOT / "workflows" / "sd15_basic.json"), "--cpu", *extra])
    out = capsys.readouterr().out
    assert code == 1 and message in out, out


def test_node_failure_reaches_the_user_as_its_message_only():
    prompt = {"5": {"class_type": "IPAdapterFusedApply", "inputs": {}, "_meta": {"title": "Apply IPAdapter (Fused)"}}}
    error = {"node_id": "5", "node_type": "IPAdapterFusedApply",
             "exception_type": "ComfyUI-IPAdapter-Fused.models.loading.AdapterError",
             "exception_message": "ipaf.safetensors: the file is truncated (header says 1000 bytes, 10 on disk)",
             "traceback": ['  File "/x/custom_nodes/ComfyUI-IPAdapter-Fused/models/loading.py", line 10\n']}
    result = runner_run.RunResult(prompt_id="p", status="error", error=error, prompt=prompt)
    with pytest.raises(runner_run.PromptFailed) as info:
        result.raise_for_error()
    text = str(info.value)
    assert text == ("node #5 Apply IPAdapter (Fused) failed: "
                    "ipaf.safetensors: the file is truncated (header says 1000 bytes, 10 on disk)")
    assert info.value.code == 3
    interrupted = runner_run.RunResult(prompt_id="p", status="interrupted", prompt=prompt)
    assert interrupted.message() == "the prompt was interrupted"
    runner_run.RunResult(prompt_id="p", status="success").raise_for_error()


def test_entry_script_runs_the_package():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "run_workflow.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--example-image" in proc.stdout and "--selfcheck" in proc.stdout
