"""Windowed propagation (``Decomposer.cd_delta``) against full propagation (``Decomposer.cd``).

Outside each candidate's receptive-field window nothing changes, so the numbers must be those
of the full pass: float64 to 1e-10 of the scale, float32 within its tolerance.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastacd
from fastacd import agg_2d
from fastacd.engine import windowed

from conftest import assert_close_scaled
from models import ConcatNet, FunctionalNet, MLP, TokenMaxNet, torchvision_model

FAST_BACKENDS = [b for b in fastacd.available_backends() if b != "reference"]
ALWAYS = dict(max_cost_ratio=float("inf"))  # window even where the cost model would not


pytestmark = pytest.mark.usefixtures("one_thread")


def box(h, w, y, x, th, tw=None):
    m = torch.zeros(h, w)
    m[y:y + th, x:x + (tw or th)] = 1
    return m


def cases(h: int, w: int, seed: int = 0):
    """(base, deltas) pairs: the empty base with single tiles (corners, borders, interior,
    several sizes), a component with neighbouring tiles (overlapping receptive fields),
    and random tile sets on a random component."""
    g = torch.Generator().manual_seed(seed)
    singles = torch.stack([box(h, w, 0, 0, 8), box(h, w, h - 8, w - 8, 8), box(h, w, 0, w - 5, 5),
                           box(h, w, h - 3, 0, 3, 11), box(h, w, 22, 23, 12), box(h, w, 7, 30, 1)])
    comp = box(h, w, 16, 16, 16)
    neigh = torch.stack([box(h, w, 8, 16, 8), box(h, w, 32, 24, 8), box(h, w, 16, 8, 8),
                         box(h, w, 24, 32, 8), box(h, w, 0, 0, 8), box(h, w, 16, 16, 4)])  # last: inside
    grid = (torch.rand(1, 1, h // 8, w // 8, generator=g) > 0.7).float()
    rand_comp = F.interpolate(grid, scale_factor=8)[0, 0]
    rand_tiles = torch.stack([box(h, w, int(y) * 8, int(x) * 8, 8)
                              for y, x in torch.randint(0, h // 8, (3, 2), generator=g)])
    # (M, 1, H, W): a (3, H, W) stack would be ambiguous for a 3-channel image
    return [(torch.zeros(h, w), singles[:, None]), (comp, neigh[:, None]), (rand_comp, rand_tiles[:, None])]


ARCHS = ["vgg16", "resnet18", "resnet50", "alexnet", "mobilenet_v2"]
# Random-init MobileNetV2 is ill-conditioned under the published rules in float32 (its
# batchnorm split amplifies rounding: the float32 reference is off from the float64 one by
# 75% of the output, docs/engine.md): any change of rounding (here: the conv algorithm on a
# crop) shows, so it is compared in float64 only, as in tests/test_engine.py.
ILL_CONDITIONED_IN_FLOAT32 = {"mobilenet_v2"}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ARCHS)
def test_windowed_equals_full(name, dtype, backend):
    if dtype == torch.float32 and name in ILL_CONDITIONED_IN_FLOAT32:
        pytest.skip("float32 CD of this random-init net is ill-conditioned")
    torch.manual_seed(1)
    model = torchvision_model(name).to(dtype)
    x = torch.randn(1, 3, 64, 64).to(dtype)
    dec = fastacd.Decomposer(model, backend=backend)
    # every case group in float64 on the default backend; the component group elsewhere
    full_set = dtype == torch.float64 and backend == FAST_BACKENDS[-1]
    groups = cases(64, 64) if full_set else cases(64, 64)[1:2]
    with torch.no_grad():
        logits = dec.forward(x)
        for gi, (base, deltas) in enumerate(groups):
            base, deltas = base.to(dtype), deltas.to(dtype)
            full = dec.cd(x, torch.maximum(base, deltas))
            # deepest windowing (1.0), and the default cut-over for the component group
            for frac in (1.0, windowed.WINDOW_MAX_FRACTION) if full_set and gi == 1 else (1.0,):
                info = {}
                res = dec.cd_delta(x, base, deltas, max_fraction=frac, stats=info, **ALWAYS)
                assert info["windowed"]
                assert_close_scaled(res.relevant, full.relevant, dtype)
                assert_close_scaled(res.irrelevant, full.irrelevant, dtype)
                assert_close_scaled(res.relevant + res.irrelevant, logits.expand_as(res.relevant), dtype)


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "odd"])
def test_sorted_chunks_equal_full(name, monkeypatch):
    """Groups larger than SORTED_CHUNK are windowed in chunks sorted by each candidate's own
    windows, each chunk with its own plan: same numbers as full propagation (float64), results
    back in the candidates' order; the chunks' windows are never larger than the group's."""
    monkeypatch.setattr(windowed, "SORTED_CHUNK", 2)
    torch.manual_seed(3)
    if name == "odd":
        model, shape = OddConvNet().double().eval(), (1, 3, 40, 40)
    else:
        model, shape = torchvision_model(name).double(), (1, 3, 64, 64)
    x = torch.randn(shape, dtype=torch.float64)
    h, w = shape[2:]
    dec = fastacd.Decomposer(model)
    plans_seen = []
    real_plan = windowed.plan
    monkeypatch.setattr(windowed, "plan", lambda *a, **k: plans_seen.append(real_plan(*a, **k)) or plans_seen[-1])
    with torch.no_grad():
        for base, deltas in cases(h, w):
            plans_seen.clear()
            res = dec.cd_delta(x.to(torch.float64), base.double(), deltas.double(), **ALWAYS)
            full = dec.cd(x, torch.maximum(base.double(), deltas.double()))
            assert_close_scaled(res.relevant, full.relevant, torch.float64)
            group, chunks = plans_seen[0], plans_seen[1:]
            assert len(chunks) == -(-deltas.shape[0] // 2)
            order = group[3]
            assert sorted(order.tolist()) == list(range(deltas.shape[0]))
            for node, p in group[0].items():
                for c in chunks:
                    cp = c[0][node]
                    if p.win is not None and cp.win is not None:
                        assert cp.win.h <= p.win.h and cp.win.w <= p.win.w


class OddConvNet(nn.Module):
    """Strides, dilation, asymmetric kernels and padding, a padded ceil-mode max-pool, a
    1x1 stride-2 shortcut (positions no receptive field reaches), a residual add, a channel
    concatenation of two branches, batchnorm, ReLU6 and a scaled branch."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, (3, 5), stride=(1, 2), padding=(1, 3), dilation=(2, 1))
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.a = nn.Conv2d(6, 4, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2)
        self.short = nn.Conv2d(8, 8, 1, stride=2)
        self.head = nn.Linear(8 * 9, 5)

    def forward(self, x):
        x = self.pool(F.relu6(self.bn1(self.c1(x))))
        x = torch.cat([torch.relu(self.a(x)), 0.5 * self.b(x)], dim=1)
        x = F.relu(self.c2(x) + self.short(x))
        x = F.adaptive_avg_pool2d(x, 3).flatten(1)
        return self.head(x)


SMALL = {"odd": (lambda: OddConvNet(), (1, 3, 40, 40)),
         "functional": (lambda: FunctionalNet(), (1, 3, 16, 16)),
         "concat": (lambda: ConcatNet(), (1, 3, 12, 12)),
         "tokens_max": (lambda: TokenMaxNet(), (1, 3, 8, 8))}  # not local: recomputed in full


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("name", list(SMALL))
def test_windowed_equals_full_on_odd_ops(name, backend):
    from models import randomize_batchnorm
    torch.manual_seed(0)
    factory, shape = SMALL[name]
    model = randomize_batchnorm(factory()).eval().double()
    x = torch.randn(shape, dtype=torch.float64)
    h, w = shape[2:]
    dec = fastacd.Decomposer(model, backend=backend)
    deltas = torch.stack([box(h, w, 0, 0, 3), box(h, w, h - 4, w - 4, 4), box(h, w, h // 2, 1, 2, 5),
                          box(h, w, 1, w - 3, 3)]).double()
    bases = [torch.zeros(h, w, dtype=torch.float64), box(h, w, 2, 2, h // 3).double()]
    with torch.no_grad():
        for base in bases:
            full = dec.cd(x, torch.maximum(base, deltas))
            for frac in (0.5, 1.0):
                res = dec.cd_delta(x, base, deltas, max_fraction=frac, **ALWAYS)
                assert_close_scaled(res.relevant, full.relevant, torch.float64)


def test_plan_tracks_receptive_fields():
    """A tile's window grows by the kernel's reach and shrinks with the stride."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(2, 2, 5, stride=2, padding=2), nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).eval()
    dec = fastacd.Decomposer(model)
    x = torch.randn(1, 1, 32, 32)
    values, _ = dec._total_pass(x)
    win0 = windowed.Window(torch.tensor([10, 0]), torch.tensor([12, 28]), 4, 4)
    plans, (win_macs, full_macs), _, _ = windowed.plan(dec.graph, values, win0, max_fraction=1.0)
    wins = [(p.win.oy.tolist(), p.win.ox.tolist(), p.win.h, p.win.w) if p.win is not None else None
            for p in plans.values()]
    # conv 3x3 pad 1: rows 9..14 (6); relu: same; pool 2: rows 4..7 (4); conv 5x5 s2 p2:
    # rows ceil((4+2-4)/2) = 1 .. floor((7+2)/2) = 4; the second tile's columns 12..15 reach
    # 5..7 only (the map ends), the common size 4 moves its window to 4..7
    assert wins[0] == ([9, 0], [11, 26], 6, 6)       # the corner tile is clamped to the map
    assert wins[1] == wins[0]
    assert wins[2] == ([4, 0], [5, 12], 4, 4)
    assert wins[3] == ([1, 0], [2, 4], 4, 4)
    assert wins[4] is None and wins[5] is None        # flatten and the linear head: full
    assert win_macs < full_macs


def small_vgg() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval().double()


def test_decomposer_cd_delta_api_and_fallbacks():
    model = small_vgg()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    dec = fastacd.Decomposer(model)
    base = box(64, 64, 16, 16, 16).double()
    deltas = torch.stack([box(64, 64, 8, 16, 8), box(64, 64, 20, 20, 4)]).double()  # 2nd inside the base
    with torch.no_grad():
        full = dec.cd(x, torch.maximum(base, deltas))
        res = dec.cd_delta(x, base, deltas)                             # default cost model
        assert_close_scaled(res.relevant, full.relevant, torch.float64)
        assert_close_scaled(res.output, full.output, torch.float64)
        info = {}
        never = dec.cd_delta(x, base, deltas, max_cost_ratio=0.0, stats=info)  # falls back to cd
        assert info["windowed"] is False
        assert_close_scaled(never.relevant, full.relevant, torch.float64)
        for chunk in (1, 2):
            part = dec.cd_delta(x, base, deltas, chunk_size=chunk, **ALWAYS)
            assert_close_scaled(part.relevant, full.relevant, torch.float64)
        ref = fastacd.Decomposer(model, backend="reference").cd_delta(x, base, deltas)
        assert_close_scaled(ref.relevant, full.relevant, torch.float64)
        per_channel = deltas[:, None].expand(-1, 3, -1, -1).clone()
        per_channel[0, 1] = 0                                           # one channel left out
        res_c = dec.cd_delta(x, base, per_channel, **ALWAYS)
        full_c = dec.cd(x, torch.maximum(base[None], per_channel))
        assert_close_scaled(res_c.relevant, full_c.relevant, torch.float64)
    mlp = MLP().eval().double()  # not an image model: plain cd
    xm = torch.randn(1, 12, dtype=torch.float64)
    dm = fastacd.Decomposer(mlp)
    with torch.no_grad():
        b, d = (torch.arange(12) < 3).double(), torch.eye(12, dtype=torch.float64)[5:8]
        assert_close_scaled(dm.cd_delta(xm, b, d).relevant, dm.cd(xm, torch.maximum(b, d)).relevant,
                            torch.float64)
    with pytest.raises(ValueError, match="one mask"):
        dec.cd_delta(x, deltas, deltas)


def test_cd_groups_one_total_pass_many_groups():
    torch.manual_seed(0)
    model = torchvision_model("resnet18").double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    dec = fastacd.Decomposer(model)
    base = box(64, 64, 0, 0, 16).double()
    tiles = torch.stack([box(64, 64, 16, 0, 8), box(64, 64, 0, 16, 8)]).double()
    with torch.no_grad():
        (b_rel, rel), (none, plain), (only, nothing) = windowed.cd_groups(
            dec, x, [(base, tiles, True), (None, tiles, False), (base, None, True)], max_cost_ratio=float("inf"))[0]
        assert none is None and nothing is None
        assert_close_scaled(b_rel, dec.cd(x, base).relevant, torch.float64)
        assert_close_scaled(only, dec.cd(x, base).relevant, torch.float64)
        assert_close_scaled(rel, dec.cd(x, torch.maximum(base, tiles)).relevant, torch.float64)
        assert_close_scaled(plain, dec.cd(x, tiles).relevant, torch.float64)


def test_agglomerate_uses_windows_and_keeps_results():
    """The Scorer groups component-plus-tile / single tiles by base; results equal the
    unwindowed Scorer's (the reference comparison is tests/test_agg_2d.py)."""
    model = small_vgg()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    im = x[0].permute(1, 2, 0).numpy().copy()
    lab = int(model(x).argmax())
    stats = {}
    fast = agg_2d.agglomerate(model, None, 85, "cd", 8, im, lab, num_iters=3, im_torch=x, stats=stats)
    assert stats["windowed"] > 0.5 * stats["scored"]
    dec = fastacd.api.decomposer_for(model)
    units = agg_2d.TileUnits((64, 64), 8)
    plain = agg_2d.Scorer(units, "cd", model, dec=dec, x=x, windowed=False)
    slow = agg_2d.run_merges(agg_2d.run_iterations(units, plain, 85, "cd", lab, 3, im.shape), plain, lab)
    assert plain.windowed == 0
    for a, b in zip(fast["comps_list"], slow["comps_list"]):
        assert np.array_equal(a, b)
    for a, b in zip(fast["scores_list"], slow["scores_list"]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("name", ["small_vgg", "resnet18"])
def test_kept_and_derived_bases_equal_full(name):
    """Bases kept across cd_groups calls (``totals``) and new bases derived from a kept one by a
    windowed pass give the numbers of full propagation; so do the base outputs that go through
    the shared head and masks scored by the deferred full pass in the same call."""
    torch.manual_seed(0)
    model = small_vgg() if name == "small_vgg" else torchvision_model(name).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    dec = fastacd.Decomposer(model)
    comp = box(64, 64, 16, 16, 16).double()
    grown = torch.maximum(comp, box(64, 64, 32, 16, 8).double())           # the component, grown
    tiles = torch.stack([box(64, 64, 8, 16, 8), box(64, 64, 16, 32, 8), box(64, 64, 40, 40, 8)]).double()[:, None]
    lone = box(64, 64, 0, 0, 64, 8).double()[None]                          # full propagation
    totals = {}
    with torch.no_grad():
        calls = [[(torch.zeros(64, 64, dtype=torch.float64), tiles, False), (comp, tiles, True)],
                 [(comp.clone(), tiles, True), (grown, tiles, True), (None, lone, False), (grown, None, True)]]
        seen = []
        for groups in calls:
            info = [{} for _ in groups]
            res, out = windowed.cd_groups(dec, x, groups, stats=info, totals=totals, **ALWAYS)
            assert_close_scaled(out, dec.forward(x), torch.float64)
            for (base, deltas, want), (b_rel, rel), st in zip(groups, res, info):
                if deltas is not None:
                    want_masks = deltas if base is None else torch.maximum(base, deltas)
                    assert_close_scaled(rel, dec.cd(x, want_masks).relevant, torch.float64)
                if want:
                    assert_close_scaled(b_rel, dec.cd(x, base).relevant, torch.float64)
                seen.append(st.get("base"))
        # empty base propagated; comp derived from it (the window of a 16x16 box); then comp
        # kept in the second call (an equal mask, another tensor) and grown derived from comp
        assert seen[0] == "propagated" and seen[2] == "kept"
        if name == "small_vgg":  # receptive fields small enough at 64x64 to derive from a kept base
            assert seen[1] == "derived" and seen[3] == "derived"
            assert len(totals["bases"].items) == 3


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_paste_one_and_many_candidates(channels_last):
    """``paste``: one candidate (a derived base) is a copy of the base in its own layout with
    the window written in; several go through window_gather (NCHW). The same values both ways."""
    from fastacd import ops
    from fastacd.engine.windows import Window
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 6, 9, 10, generator=gen)
    if channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
    win_t = torch.randn(3, 6, 4, 3, generator=gen)
    win = Window(torch.tensor([0, 5, 2]), torch.tensor([7, 1, 4]), 4, 3)
    before = base.clone()
    many = windowed.paste(ops, base, win_t, win)
    for j in range(3):
        one = windowed.paste(ops, base, win_t[j:j + 1], Window(win.oy[j:j + 1], win.ox[j:j + 1], 4, 3))
        want = base.clone()
        want[0, :, int(win.oy[j]):int(win.oy[j]) + 4, int(win.ox[j]):int(win.ox[j]) + 3] = win_t[j]
        assert torch.equal(one, want) and torch.equal(many[j:j + 1], want)
        assert one.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(base, before)  # the base is left as it was


def test_kept_totals_follow_the_weights():
    """``totals`` kept across calls are made again when the model's weights change (in place or
    new ``.data``): the numbers are those of the new weights, never the kept ones."""
    torch.manual_seed(0)
    model = small_vgg().double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    dec = fastacd.Decomposer(model)
    comp = box(64, 64, 16, 16, 16).double()
    tiles = torch.stack([box(64, 64, 8, 16, 8), box(64, 64, 40, 40, 8)]).double()[:, None]
    totals = {}
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        for change in (None, lambda: conv.weight.mul_(1.5), lambda: setattr(conv.bias, "data", conv.bias.data + 0.3)):
            if change is not None:
                change()
            [(b_rel, rel)], out = windowed.cd_groups(dec, x, [(comp, tiles, True)], totals=totals, **ALWAYS)
            assert_close_scaled(out, dec.forward(x), torch.float64)
            assert_close_scaled(rel, dec.cd(x, torch.maximum(comp, tiles)).relevant, torch.float64)
            assert_close_scaled(b_rel, dec.cd(x, comp).relevant, torch.float64)


def test_base_cache_stays_within_its_budget():
    torch.manual_seed(0)
    model = small_vgg()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    dec = fastacd.Decomposer(model)
    tiles = torch.stack([box(64, 64, 8, 16, 8), box(64, 64, 40, 40, 8)]).double()
    bases = [box(64, 64, 8 * i, 8 * i, 16).double() for i in range(4)]
    with torch.no_grad():
        totals = {}
        windowed.cd_groups(dec, x, [(bases[0], tiles, False)], totals=totals, **ALWAYS)
        one = totals["bases"].items[0].size
        dec.memory_budget = 2 * (2 * one + one // 2)  # the cache gets half: room for two bases
        totals.clear()
        for b in bases:
            (_, rel), = windowed.cd_groups(dec, x, [(b, tiles, False)], totals=totals, **ALWAYS)[0]
            assert_close_scaled(rel, dec.cd(x, torch.maximum(b, tiles)).relevant, torch.float64)
            cache = totals["bases"]
            assert len(cache.items) <= 2 and sum(bm.size for bm in cache.items) <= cache.limit
        assert torch.equal(cache.items[-1].mask.reshape(64, 64), bases[-1])  # the newest is kept


def test_single_live_cache_does_not_keep_graphs_alive():
    """``single_live`` caches per graph; the cache held every graph it saw (and through it the
    model's layers and weights) for the life of the process: a hierarchy of a 224x224
    AlexNet kept its Linear layers alive after the model was dropped."""
    import gc
    import weakref
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    layer = weakref.ref(model[3])
    dec = fastacd.Decomposer(model)
    assert windowed.single_live(dec.graph)  # computed and cached
    assert windowed.single_live(dec.graph) is windowed.single_live(dec.graph)
    del model, dec
    gc.collect()
    assert layer() is None


def test_plan_windows_reach_the_device_in_one_copy():
    """A windowed pass moves its plan's windows (made on the CPU) to the device in one copy,
    not two per window and chunk (25,000 copies kept an H200 idle 87% of one VGG16 ACD);
    on the plan's own device they are slices, no copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastacd.engine.windows import Window, on_device
    g = torch.Generator().manual_seed(0)
    wins = [Window(torch.randint(0, 9, (6,), generator=g), torch.randint(0, 9, (6,), generator=g), 3, 4)
            for _ in range(5)]

    class Copies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Copies.n += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    with Copies():
        same = on_device([wins[0], None] + wins[1:], 1, 4, "cpu")
    assert Copies.n == 0 and same[1] is None
    same = [same[0]] + same[2:]
    assert all(torch.equal(a.oy, w.oy[1:4]) and torch.equal(a.ox, w.ox[1:4]) and (a.h, a.w) == (3, 4)
               for a, w in zip(same, wins))
    with Copies():
        moved = on_device(wins, 1, 4, "meta")
    assert Copies.n == 1
    assert all(m.oy.device.type == "meta" and m.oy.shape == m.ox.shape == (3,) and (m.h, m.w) == (3, 4)
               for m in moved)
