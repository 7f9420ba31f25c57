"""Feature distance and smoothing against independent computations (scipy, the raw weights)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from lasb import features


def test_gaussian_smooth_matches_scipy():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 40, 48)).astype(np.float32)
    ours = features.gaussian_smooth(torch.from_numpy(maps), sigma=2.0).numpy()
    ref = np.stack([ndimage.gaussian_filter(m, 2.0, mode="reflect", truncate=4.0) for m in maps])
    # torch reflect excludes the edge pixel, scipy's "reflect" repeats it: compare the interior
    np.testing.assert_allclose(ours[:, 9:-9, 9:-9], ref[:, 9:-9, 9:-9], atol=1e-5)


def test_backbone_loads_the_packaged_imagenet_weights():
    bb = features.build_backbone("efficientnet-lite0", (2, 4), 64)
    state = torch.load(features._weights_path("efficientnet-lite0"), weights_only=True)
    torch.testing.assert_close(bb.stem[0].weight, state["_conv_stem.weight"])
    torch.testing.assert_close(bb.blocks[2]._project_conv.weight,
                               state["_blocks.2._project_conv.weight"])
    outs = bb(torch.zeros(1, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [16, 8]  # strides 4 and 8


def test_feature_distance_is_zero_for_identical_and_local_for_a_local_change():
    bb = features.build_backbone("efficientnet-lite0", (2, 4), 64)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    assert features.feature_distance(bb, a, a).abs().max() < 1e-5
    b = a.clone()
    b[:, :, 40:52, 40:52] = 1.0  # a white square defect
    d = features.feature_distance(bb, a, b)[0]
    assert d[40:52, 40:52].mean() > 3 * d[:20, :20].mean()


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        features.build_backbone("resnet9000", (1,), 64)
