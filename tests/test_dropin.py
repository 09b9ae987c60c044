"""``import fastacd as acd`` exposes the original package's public names."""
import importlib.util

import pytest
import torch

import fastacd
from fastacd.reference import cd as reference_cd

# the names notebooks written for acd 0.0.2 call (top level and submodules)
DROP_IN = {
    "": ["cd", "cd_text", "agg_1d", "agg_2d", "tiling_1d", "tiling_2d", "get_scores_1d",
         "get_scores_2d", "gradient_times_input_scores", "ig_scores_1d", "ig_scores_2d",
         "tiles_to_cd", "propagate_three", "propagate_tanh_two"],
    "agg_2d": ["agglomerate", "threshold_scores", "smooth_im_thresh", "establish_correspondence",
               "refine_scores"],
    "agg_1d": ["agglomerate", "collapse_tree", "threshold_scores"],
    "tiling_2d": ["gen_tiles", "gen_tiles_around_baseline", "gen_tile_from_comp", "combine_tiles"],
    "tiling_1d": ["gen_tiles", "gen_tiles_around_baseline", "gen_tile_from_comp"],
}

# per-architecture internals of the original that the traced engine replaces (docs/engine.md)
NOT_PROVIDED = {"cd_generic", "cd_propagate_mnist", "cd_propagate_resnet", "cd_track_vgg",
                "propagate_conv_linear", "propagate_batchnorm2d", "propagate_pooling",
                "propagate_independent", "propagate_relu", "propagate_basic_block",
                "propagate_lstm", "conv2dnp"}


@pytest.mark.parametrize("module", sorted(DROP_IN))
def test_drop_in_names_exist_and_are_callable(module):
    mod = getattr(fastacd, module) if module else fastacd
    for name in DROP_IN[module]:
        assert hasattr(mod, name), f"fastacd.{module + '.' if module else ''}{name} is missing"
        assert callable(getattr(mod, name)) or module == "", name


def _own_functions(module):
    import inspect
    return {n for n, v in vars(module).items()
            if inspect.isfunction(v) and v.__module__ == module.__name__ and not n.startswith("_")}


@pytest.mark.skipif(importlib.util.find_spec("acd") is None, reason="the original acd is not installed")
def test_every_public_function_of_the_original_is_provided_or_documented_as_replaced():
    import acd
    from acd.scores import cd as acd_cd, score_funcs as acd_score_funcs
    top = set()
    for mod in (acd_cd, acd_score_funcs):
        top |= _own_functions(mod)
    missing = sorted(n for n in top - NOT_PROVIDED if not hasattr(fastacd, n))
    assert missing == [], f"fastacd lacks the original's top-level functions {missing}"
    for sub in ("agg_1d", "agg_2d", "tiling_1d", "tiling_2d"):
        theirs = getattr(acd, sub)
        missing = sorted(n for n in _own_functions(theirs) if not hasattr(getattr(fastacd, sub), n))
        assert missing == [], f"fastacd.{sub} lacks {missing}"


def test_replaced_submodule_is_traced_again():
    """``acd.cd`` keeps a traced Decomposer per model (and the reference a graph): after
    ``model[3] = nn.Linear(...)`` both decompose the model as it is now, not the kept trace."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(1, 3, 8, 8)
    mask = torch.zeros(8, 8)
    mask[:4] = 1
    with torch.no_grad():
        before, _ = fastacd.cd(x, model, mask)
        reference_cd(model, x, mask[None])
        model[3] = torch.nn.Linear(4 * 6 * 6, 5)
        after, _ = fastacd.cd(x, model, mask)
        fresh = fastacd.Decomposer(model).cd(x, mask[None]).relevant
        ref_after = reference_cd(model, x, mask[None])[0]
    assert not torch.allclose(before, fresh)
    torch.testing.assert_close(after, fresh)
    torch.testing.assert_close(ref_after, fresh, rtol=1e-5, atol=1e-6)
    # a Decomposer the user holds says so instead of decomposing the old module
    dec = fastacd.Decomposer(model)
    model[3] = torch.nn.Linear(4 * 6 * 6, 5).eval()
    with pytest.raises(ValueError, match="modules changed since this Decomposer captured it"):
        dec.cd(x, mask[None])


def test_forward_replaced_on_an_instance_is_what_is_decomposed():
    """A forward replaced on a module instance (``model.fc.forward = ...``, as wrappers such as
    accelerate's do) is what the model computes: the capture traces it instead of applying the
    module type's rule, and a replacement after capture is traced again (a held Decomposer
    refuses)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(1, 3, 8, 8)
    masks = torch.zeros(2, 8, 8)
    masks[0, :4], masks[1, :, 2:5] = 1, 1
    fc = model[3]
    with torch.no_grad():
        fastacd.cd(x, model, masks)
        dec = fastacd.Decomposer(model)
        fc.forward = lambda v: torch.nn.functional.linear(v, 3 * fc.weight, fc.bias)
        rel, irrel = fastacd.cd(x, model, masks)
        torch.testing.assert_close(rel + irrel, model(x).expand(2, -1))
        ref_rel, _ = reference_cd(model, x, masks)
        torch.testing.assert_close(rel, ref_rel, rtol=1e-5, atol=1e-6)
        del fc.forward
        plain_rel, _ = fastacd.cd(x, model, masks)
        assert not torch.allclose(plain_rel, rel, atol=1e-3)
        torch.testing.assert_close(plain_rel, reference_cd(model, x, masks)[0], rtol=1e-5, atol=1e-6)
        fc.forward = fc.forward
        with pytest.raises(ValueError, match="or a forward replaced"):
            dec.cd(x, masks)
