"""ACD hierarchies on patch models (issue 16 item 5): ``fastacd.hierarchy``, the drop-in
``agg_2d.agglomerate`` and ``fastacd run`` on ViT, Swin and ConvNeXt, tiles on the patch
grid by default.

Small configurations (32-64 px, two blocks) for speed; the drop-in's lists are checked
against the oracle (``fastacd.reference.agg_2d``, one ``reference.cd`` per mask), the tree's
levels, shapes and alignment directly, and node scores against the reference's CD of the
node's mask.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fastacd
from fastacd import agg_2d
from fastacd.image.hierarchy import Hierarchy, default_sweep_dim, hierarchy, patch_size
from fastacd.reference import agg_2d as ref_agg

from cli_models import tiny_vit
from test_agg_2d import assert_same_lists
from test_cli import manifest, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
torchvision = pytest.importorskip("torchvision")


def tiny_swin() -> nn.Module:
    from torchvision.models import SwinTransformer
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[3, 3],
                           num_classes=5, stochastic_depth_prob=0.0).eval()


def tiny_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.0,
                    num_classes=5).eval()


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 5)).eval()


def smooth_image(size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    small = torch.randn(1, 3, size // 8, size // 8, generator=g, dtype=torch.float64)
    return nn.functional.interpolate(small, size=size, mode="bilinear")


def graph_of(model):
    return fastacd.Decomposer(model).graph


# ---- the patch grid -------------------------------------------------------------------------
def test_patch_size_finds_the_patch_embedding():
    assert patch_size(graph_of(tiny_vit())) == 8          # conv_proj 8x8 stride 8
    assert patch_size(graph_of(tiny_swin())) == 4         # features[0][0] 4x4 stride 4
    assert patch_size(graph_of(tiny_convnext())) == 4     # the stem, 4x4 stride 4
    assert patch_size(graph_of(tiny_cnn())) is None       # 3x3, stride 1, padded: not a patch
    resnet = torchvision.models.resnet18(num_classes=3).eval()
    assert patch_size(graph_of(resnet)) is None           # 7x7 stride 2, padded


def test_patch_size_of_timm_patch_embeddings():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=1)
    assert patch_size(graph_of(model.eval())) == 16


@pytest.mark.parametrize("arch,patch", [("vit_b_16", 16), ("swin_t", 4), ("convnext_tiny", 4),
                                        ("maxvit_t", None), ("vgg16", None)])
def test_factory_models_default_tiles(arch, patch):
    """The defaults at 224: 16 (the patch grid) for the patch models, the paper's 14 otherwise."""
    model = torchvision.models.get_model(arch, weights=None, num_classes=3).eval()
    assert patch_size(graph_of(model)) == patch
    assert default_sweep_dim((224, 224), patch) == (14 if patch is None else 16)


def test_default_sweep_dim():
    assert default_sweep_dim((224, 224)) == 14                  # the paper's ceil(224 / 16)
    assert default_sweep_dim((224, 224), 16) == 16              # ViT-B/16: the patch
    assert default_sweep_dim((224, 224), 4) == 16               # Swin, ConvNeXt: 4 patches a side
    assert default_sweep_dim((224, 224), 32) == 32              # ViT-B/32: one patch
    assert default_sweep_dim((64, 64), 8) == 8                  # ceil(64 / 16) = 4 -> the patch
    assert default_sweep_dim((64, 48), 4) == 4                  # the shorter side sets it: 3 -> 4
    assert default_sweep_dim((12, 12), 16) == 1                 # a patch larger than the image


# ---- hierarchies ------------------------------------------------------------------------------
def assert_on_grid(mask: np.ndarray, tile: int):
    """A pixel mask that is constant on every tile x tile block of the grid from (0, 0)."""
    h, w = mask.shape
    blocks = mask.reshape(h // tile, tile, w // tile, tile)
    assert (blocks == blocks[:, :1, :, :1]).all()


def test_vit_hierarchy_tiles_are_patches():
    """Default tiles on a 64 px ViT with 8 px patches: 8 (not the paper's ceil(64/16) = 4);
    levels partition their blobs, nest, end in one root; every blob is a union of patches and
    scores the reference's CD of its mask; the tree is the drop-in's lists."""
    model = tiny_vit().double()
    x = smooth_image(64)
    h = hierarchy(model, x, percentile_include=80, num_iters=3)
    assert h.sweep_dim == 8 and h.image_hw == (64, 64)
    levels = h.levels()
    assert h.num_levels == len(levels) >= 3 and len(h.roots()) == 1
    for level in levels:
        masks = [h.mask(n) for n in level]
        assert all(m.shape == (64, 64) for m in masks)
        assert sum(m.astype(int) for m in masks).max() <= 1  # the blobs of a level are disjoint
        for m in masks:
            assert_on_grid(m, 8)
    for upper in levels[1:]:
        for node in upper:
            assert all(set(h.node(c).units) <= set(node.units) for c in node.children)
    # scores: the relevant logit of the label for the node's pixel mask, by the oracle
    nodes = [levels[0][0], levels[-1][0]]
    masks = torch.from_numpy(np.stack([h.mask(n) for n in nodes]).astype(np.float64))[:, None]
    with torch.no_grad():
        rel, _ = fastacd.reference.cd(model, x, masks.expand(-1, 3, -1, -1))
    for node, r in zip(nodes, rel):
        assert node.score == pytest.approx(float(r[h.label]), rel=1e-9, abs=1e-12)
    lists = agg_2d.agglomerate(model, None, 80, "cd", 8, x[0].permute(1, 2, 0).numpy(), h.label,
                               num_iters=3, im_torch=x)
    assert len(lists["comps_list"]) - 1 == h.num_levels
    for level, comps in zip(levels, lists["comps_list"][1:]):
        for node in level:
            assert np.array_equal(h.unit_mask(node), comps == node.component)


@pytest.mark.parametrize("name", ["vit", "swin", "convnext"])
def test_dropin_agglomerate_equals_the_oracle(name):
    """``agg_2d.agglomerate`` (batched, cached) = ``reference.agg_2d.agglomerate`` (one mask a
    call through the reference CD), float64, tiles on the patch grid."""
    model = {"vit": tiny_vit, "swin": tiny_swin, "convnext": tiny_convnext}[name]().double()
    size, tile = (64 if name == "vit" else 32), 8  # the ViT's position embedding fixes its size
    x = smooth_image(size, seed=1)
    with torch.no_grad():
        label = int(model(x).argmax())
    im = x[0].permute(1, 2, 0).numpy()
    fast = agg_2d.agglomerate(model, None, 75, "cd", tile, im, label, num_iters=2, im_torch=x, device="cpu")
    ref = ref_agg.agglomerate(model, None, 75, "cd", tile, im, label, num_iters=2, im_torch=x, device="cpu")
    assert_same_lists(fast, ref)
    assert len(fast["comps_list"]) >= 3
    for comps in fast["comps_list"][1:]:  # the first entry is the original's placeholder
        assert comps.shape == (size // tile, size // tile)


# ---- fastacd run ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("patch_images")
    rng = np.random.default_rng(0)
    a = rng.random((80, 96, 3)) * 0.5
    a[20:50, 30:70] += 0.5
    Image.fromarray((a.clip(0, 1) * 255).astype(np.uint8)).save(root / "img0.png")
    return root


def test_run_patch_model_default_tiles(image_dir, tmp_path):
    """``fastacd run --model`` with a 64 px ViT (8 px patches): the recorded tiles are 8."""
    out = tmp_path / "vit"
    assert run_cli("run", image_dir, "--out", out, "--model", "cli_models:tiny_vit", "--image-size", "64",
                   "--num-iters", "2", "--percentile-include", "80", "--threads", "1", "--no-progress") == 0
    (rec,) = manifest(out)
    assert rec["status"] == "ok"
    h = Hierarchy.from_json((out / rec["outputs"]["json"]).read_text())
    assert h.sweep_dim == 8 and h.image_hw == (64, 64) and h.num_levels == rec["num_levels"] >= 2
    for node in h.nodes:
        assert_on_grid(h.mask(node), 8)


@pytest.mark.parametrize("arch", ["swin_t", "convnext_tiny"])
def test_run_arch_swin_and_convnext(image_dir, tmp_path, arch):
    """``fastacd run --arch`` on torchvision's Swin-T and ConvNeXt-Tiny as built (random init),
    at 64 px with 16 px tiles (4 of their 4 px patches a side), one iteration."""
    out = tmp_path / arch
    assert run_cli("run", image_dir, "--out", out, "--arch", arch, "--num-classes", "4", "--image-size", "64",
                   "--sweep-dim", "16", "--num-iters", "1", "--label", "2", "--threads", "1",
                   "--no-progress") == 0
    (rec,) = manifest(out)
    assert rec["status"] == "ok" and rec["label"] == 2
    h = Hierarchy.from_json((out / rec["outputs"]["json"]).read_text())
    assert h.sweep_dim == 16 and len(h.roots()) == 1
    assert all(len(n.class_scores) == 4 for n in h.nodes)


def test_run_warns_when_every_output_is_equal(image_dir, tmp_path, capsys):
    """A ViT with torchvision's zero-initialised head (what ``--arch vit_b_16`` is without
    weights): all outputs 0, every score the same, no blobs: the run says why."""
    out = tmp_path / "flat"
    assert run_cli("run", image_dir, "--out", out, "--model", "cli_models:flat_vit", "--image-size", "64",
                   "--num-iters", "1", "--threads", "1", "--no-progress") == 0
    assert "outputs are all equal" in capsys.readouterr().err
    (rec,) = manifest(out)
    assert rec["status"] == "ok" and rec["num_levels"] == 0


@pytest.mark.slow
def test_run_arch_vit_b_16(image_dir, tmp_path, capsys):
    """``fastacd run --arch vit_b_16`` at its 224 px with the default tiles (16: its patches),
    one iteration. Random init: torchvision's head is zero, so every output is 0 and the
    hierarchy has no blobs (the run warns); the blobs on a patch grid are tested above."""
    out = tmp_path / "vit_b_16"
    assert run_cli("run", image_dir, "--out", out, "--arch", "vit_b_16", "--num-classes", "4",
                   "--num-iters", "1", "--label", "1", "--threads", "1", "--no-progress") == 0
    assert "outputs are all equal" in capsys.readouterr().err
    (rec,) = manifest(out)
    assert rec["status"] == "ok"
    h = Hierarchy.from_json((out / rec["outputs"]["json"]).read_text())
    assert h.sweep_dim == 16 and h.image_hw == (224, 224)
