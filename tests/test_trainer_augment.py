"""Rotation and zoom are one affine resampling: what it does to a known image."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.model.augment import RandomRotationZoom, build_augmenter
from trainer.config import AugmentConfig

SIZE = 33  # odd: the centre is a pixel


def _ramp(batch: int) -> np.ndarray:
    """Images whose pixel value is its column index, in every channel."""
    columns = np.tile(np.arange(SIZE, dtype=np.float32), (SIZE, 1))
    return np.repeat(np.repeat(columns[None, :, :, None], 3, axis=3), batch, axis=0)


def _slopes(images: np.ndarray, axis: int) -> np.ndarray:
    """Per image, the change of value per pixel along ``axis`` near the centre (where no edge is reflected)."""
    centre, reach = SIZE // 2, 4
    if axis == 1:  # down the centre column
        line = images[:, centre - reach:centre + reach + 1, centre, 0]
    else:  # along the centre row
        line = images[:, centre, centre - reach:centre + reach + 1, 0]
    return (line[:, -1] - line[:, 0]) / (2 * reach)


def test_zoom_alone_scales_around_the_centre_by_a_factor_within_the_range():
    layer = RandomRotationZoom(0.0, zoom=0.2, seed=3)
    out = np.asarray(layer(_ramp(16), training=True))
    slopes = _slopes(out, axis=2)
    assert np.all((slopes > 0.8 - 1e-3) & (slopes < 1.2 + 1e-3))
    assert slopes.std() > 0.02  # a different zoom per image
    assert np.allclose(out[:, SIZE // 2, SIZE // 2, 0], SIZE // 2, atol=1e-3)  # the centre stays put


def test_rotation_and_zoom_compose_in_one_transform():
    layer = RandomRotationZoom((0.25, 0.25), zoom=0.2, seed=4)  # exactly a quarter turn, zoom in [0.8, 1.2]
    out = np.asarray(layer(_ramp(8), training=True))
    along_rows, down_columns = _slopes(out, axis=2), _slopes(out, axis=1)
    assert np.allclose(along_rows, 0.0, atol=1e-3)  # the column ramp now runs vertically
    assert np.all((np.abs(down_columns) > 0.8 - 1e-3) & (np.abs(down_columns) < 1.2 + 1e-3))


def test_the_layer_is_the_identity_outside_training():
    images = _ramp(2)
    assert np.array_equal(np.asarray(RandomRotationZoom(0.1, zoom=0.2, seed=1)(images, training=False)), images)


def test_the_augmenter_resamples_once_for_rotation_and_zoom():
    augmenter = build_augmenter(AugmentConfig(flip=True, rotation=0.05, zoom=0.1, contrast=0.1), seed=0)
    kinds = [type(layer).__name__ for layer in augmenter.layers]
    assert kinds == ["RandomFlip", "RandomRotationZoom", "RandomContrast"]
    assert build_augmenter(AugmentConfig(flip=False, rotation=0.0, zoom=0.0, contrast=0.0), seed=0) is None


def test_zoom_outside_its_range_is_refused():
    with pytest.raises(ValueError, match="zoom"):
        RandomRotationZoom(0.1, zoom=1.5)
