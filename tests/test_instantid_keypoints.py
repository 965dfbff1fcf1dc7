"""InstantID's keypoint picture, checked against what the reference pipeline draws (its draw_kps):
a black canvas of the image's size; from each eye and mouth corner to the nose an ellipse, half-axes
(limb length / 2, 4 px), in the outer point's colour times 0.6 (8-bit, truncated); then a disc of
radius 10 px in each point's full colour (red, green, blue, yellow, magenta in insightface's order:
left eye, right eye, nose, left mouth corner, right mouth corner)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ipadapter_fused.nodes.instantid import draw_keypoints

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
NOSE = 2
# a face in a 160 x 200 (w x h) picture: eyes above, mouth corners below the nose, limbs 30..50 px long
KPS = np.array([[50.0, 60.0], [110.0, 62.0], [80.0, 100.0], [55.0, 140.0], [105.0, 138.0]])
H, W = 200, 160


def _px(img, x, y):
    return tuple(int(round(float(v) * 255)) for v in img[0, int(y), int(x)])


@pytest.fixture(scope="module")
def picture():
    return draw_keypoints(KPS, H, W)


def test_an_image_of_the_given_size_in_0_to_1(picture):
    assert picture.shape == (1, H, W, 3) and picture.dtype == torch.float32
    assert float(picture.min()) >= 0.0 and float(picture.max()) <= 1.0


def test_each_keypoint_is_a_disc_of_radius_10_in_its_full_colour(picture):
    for (x, y), colour in zip(KPS, COLOURS):
        assert _px(picture, x, y) == colour
        for dx, dy in ((9, 0), (0, -9), (-6, 6)):  # inside the disc
            assert _px(picture, x + dx, y + dy) == colour
    # just outside the nose's disc, away from every limb: black
    assert _px(picture, 80 + 12, 100 - 8) == (0, 0, 0)


def test_limbs_join_each_point_to_the_nose_dimmed_to_60_percent(picture):
    for end in (0, 1, 3, 4):
        (x0, y0), (x1, y1) = KPS[end], KPS[NOSE]
        mid = ((x0 + x1) / 2, (y0 + y1) / 2)
        dimmed = tuple(math.floor(c * 0.6) for c in COLOURS[end])
        assert _px(picture, *mid) == dimmed, f"limb {end}: midpoint"
        # 2 px across the limb: still inside the 4 px half-width; 7 px across: outside
        length = math.hypot(x0 - x1, y0 - y1)
        nx, ny = -(y0 - y1) / length, (x0 - x1) / length
        assert _px(picture, mid[0] + 2 * nx, mid[1] + 2 * ny) == dimmed
        assert _px(picture, mid[0] + 7 * nx, mid[1] + 7 * ny) == (0, 0, 0)


def test_the_rest_of_the_canvas_is_black(picture):
    lit = picture[0].abs().sum(-1) > 0
    # everything lit lies within 11 px of a keypoint or 5 px of a limb's axis
    ys, xs = np.nonzero(lit.numpy())
    pts = np.stack([xs, ys], 1).astype(float)
    near = np.zeros(len(pts), bool)
    for p in KPS:
        near |= np.hypot(*(pts - p).T) <= 11
    for end in (0, 1, 3, 4):
        a, b = KPS[end], KPS[NOSE]
        d = b - a
        t = np.clip(((pts - a) @ d) / (d @ d), 0, 1)
        near |= np.hypot(*(pts - (a + t[:, None] * d)).T) <= 5
    assert near.all()
    # and the lit area is about 5 discs plus 4 limbs, not more
    discs = 5 * math.pi * 10 ** 2
    limbs = sum(math.pi * 4 * math.hypot(*(KPS[e] - KPS[NOSE])) / 2 for e in (0, 1, 3, 4))
    assert 0.7 * (discs + limbs * 0.5) < lit.sum().item() < 1.2 * (discs + limbs)


def test_points_near_the_border_are_clipped_not_an_error():
    img = draw_keypoints(np.array([[0, 0], [31, 0], [16, 16], [0, 31], [31, 31]]), 32, 32)
    assert img.shape == (1, 32, 32, 3)
    assert _px(img, 0, 0) == COLOURS[0] and _px(img, 31, 31) == COLOURS[4]


@pytest.mark.parametrize("kps, h, w", [(np.zeros((4, 2)), 8, 8), (np.full((5, 2), np.nan), 8, 8),
                                       (np.zeros((5, 2)), 0, 8)])
def test_bad_keypoints_or_size_are_refused(kps, h, w):
    with pytest.raises(ValueError):
        draw_keypoints(kps, h, w)
