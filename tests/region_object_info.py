"""The /object_info entries (trimmed like test_run_workflow.OBJECT_INFO) of the nodes the region and
multi-reference workflows use (issue 9): the host's SolidMask and MaskComposite, and this pack's
'IPAdapter Region (Fused)' and 'IPAdapter Multi-Reference (Fused)' as the host reports them."""
from __future__ import annotations

WEIGHT_TYPES = ['linear', 'ease in', 'ease out', 'ease in-out', 'reverse in-out', 'weak input', 'weak output',
                'weak middle', 'strong middle', 'style transfer', 'composition', 'strong style transfer',
                'style and composition', 'style transfer precise', 'composition precise', 'custom']
_WEIGHTS = {'weight': ['FLOAT', {'default': 1.0, 'min': -1.0, 'max': 5.0, 'step': 0.05}],
            'weight_type': [WEIGHT_TYPES, {'default': 'linear'}],
            'start_at': ['FLOAT', {'default': 0.0, 'min': 0.0, 'max': 1.0, 'step': 0.001}],
            'end_at': ['FLOAT', {'default': 1.0, 'min': 0.0, 'max': 1.0, 'step': 0.001}]}

REGION_OBJECT_INFO = {
    'SolidMask': {'input': {'required': {'value': ['FLOAT', {'default': 1.0, 'min': 0.0, 'max': 1.0, 'step': 0.01}],
                                         'width': ['INT', {'default': 512, 'min': 1, 'max': 16384, 'step': 1}],
                                         'height': ['INT', {'default': 512, 'min': 1, 'max': 16384, 'step': 1}]}},
                  'input_order': {'required': ['value', 'width', 'height']},
                  'output': ['MASK'], 'output_name': ['MASK'], 'name': 'SolidMask', 'display_name': 'SolidMask',
                  'category': 'mask'},
    'MaskComposite': {'input': {'required': {'destination': ['MASK'], 'source': ['MASK'],
                                             'x': ['INT', {'default': 0, 'min': 0, 'max': 16384, 'step': 1}],
                                             'y': ['INT', {'default': 0, 'min': 0, 'max': 16384, 'step': 1}],
                                             'operation': [['multiply', 'add', 'subtract', 'and', 'or', 'xor']]}},
                      'input_order': {'required': ['destination', 'source', 'x', 'y', 'operation']},
                      'output': ['MASK'], 'output_name': ['MASK'], 'name': 'MaskComposite',
                      'display_name': 'MaskComposite', 'category': 'mask/compositing'},
    'IPAdapterFusedRegion': {
        'input': {'required': {'model': ['MODEL'], 'ipadapter': ['IPADAPTER_FUSED'], 'clip_vision': ['CLIP_VISION'],
                               'image': ['IMAGE'], 'mask': ['MASK'], 'positive': ['CONDITIONING'],
                               'negative': ['CONDITIONING'], **_WEIGHTS},
                  'optional': {'region_prompt': ['CONDITIONING'],
                               'region_prompt_strength': ['FLOAT', {'default': 1.0, 'min': 0.0, 'max': 10.0,
                                                                    'step': 0.05}]}},
        'input_order': {'required': ['model', 'ipadapter', 'clip_vision', 'image', 'mask', 'positive', 'negative',
                                     'weight', 'weight_type', 'start_at', 'end_at'],
                        'optional': ['region_prompt', 'region_prompt_strength']},
        'output': ['MODEL', 'CONDITIONING', 'CONDITIONING'], 'output_name': ['model', 'positive', 'negative'],
        'name': 'IPAdapterFusedRegion', 'display_name': 'IPAdapter Region (Fused)', 'category': 'ipadapter_fused'},
    'IPAdapterFusedMultiReference': {
        'input': {'required': {'model': ['MODEL'], 'ipadapter': ['IPADAPTER_FUSED'], 'clip_vision': ['CLIP_VISION'],
                               'clip': ['CLIP'], 'text': ['STRING', {'multiline': True, 'dynamicPrompts': True}],
                               'entities': ['STRING', {'default': ''}],
                               'routing': [['attention', 'masks'], {'default': 'attention'}],
                               'image_1': ['IMAGE'], 'image_2': ['IMAGE'], **_WEIGHTS},
                  'optional': {'image_3': ['IMAGE'], 'image_4': ['IMAGE'], 'mask_1': ['MASK'], 'mask_2': ['MASK'],
                               'mask_3': ['MASK'], 'mask_4': ['MASK'], 'object_weights': ['STRING', {'default': ''}]}},
        'input_order': {'required': ['model', 'ipadapter', 'clip_vision', 'clip', 'text', 'entities', 'routing',
                                     'image_1', 'image_2', 'weight', 'weight_type', 'start_at', 'end_at'],
                        'optional': ['image_3', 'image_4', 'mask_1', 'mask_2', 'mask_3', 'mask_4', 'object_weights']},
        'output': ['MODEL', 'CONDITIONING'], 'output_name': ['model', 'positive'],
        'name': 'IPAdapterFusedMultiReference', 'display_name': 'IPAdapter Multi-Reference (Fused)',
        'category': 'ipadapter_fused'},
}
