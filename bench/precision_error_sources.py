"""Where bf16's CD error comes from (docs/precision.md, "Where the bf16 boundary is"): each
rounding of a weight application (activation in, weight, product out) emulated alone in
float32, against real bf16 and against float32 vs float64; CD of 16 tile-union masks,
trained-like weights (numerical_zero.trained_like), 64 px, max gap over the output scale.

    .venv/bin/python bench/precision_error_sources.py
"""
import sys; from pathlib import Path; sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import torch
torch.set_num_threads(1)
import fastacd
from fastacd.ops import precision as P
from numerical_zero import trained_like
from bench_precision import image, tile_union_masks
bf = torch.bfloat16
def rnd(t): return t.to(bf).float()
variants = {
  "bf16 (real)": None,
  "emul: in+w rounded, f32 out": lambda fn, t, w, *a, **k: fn(rnd(t), rnd(w), *a, **k),
  "emul: in+w+out rounded": lambda fn, t, w, *a, **k: rnd(fn(rnd(t), rnd(w), *a, **k)),
  "emul: w only": lambda fn, t, w, *a, **k: fn(t, rnd(w), *a, **k),
  "emul: in only": lambda fn, t, w, *a, **k: fn(rnd(t), w, *a, **k),
  "emul: out only": lambda fn, t, w, *a, **k: rnd(fn(t, w, *a, **k)),
}
real = P.weight_apply
for name in ["vgg16", "resnet50"]:
    model = trained_like(name); size = 64
    x = image(0, size); masks = tile_union_masks(16, size, 0)
    with torch.no_grad():
        ref = fastacd.Decomposer(model).cd(x, masks)
        scale = ref.output.abs().max()
        for v, f in variants.items():
            if f is None:
                P.weight_apply = real; prec = "bf16"
            else:
                def wa(fn, t, w, *a, _f=f, **k):
                    if P._LOW.get() is None: return fn(t, w, *a, **k)
                    return _f(fn, t, w, *a, **k)
                P.weight_apply = wa; prec = "float32"
            import fastacd.rules.affine as A; A.weight_apply = P.weight_apply
            d = fastacd.Decomposer(model, precision=prec, channels_last=True)
            r = d.cd(x, masks)
            print(name, v, f"{float((r.relevant-ref.relevant).abs().max()/scale):.2e}", flush=True)
    P.weight_apply = real; A.weight_apply = real
for name in ["vgg16", "resnet50"]:
    model = trained_like(name)
    x = image(0, 64)
    masks = tile_union_masks(16, 64, 0)
    with torch.no_grad():
        ref = fastacd.Decomposer(model).cd(x, masks)
        r64 = fastacd.Decomposer(model.double()).cd(x.double(), masks.double())
    print(name, "float32 vs float64", f"{float((ref.relevant.double() - r64.relevant).abs().max() / r64.output.abs().max()):.2e}")
