"""CDEP against vanilla training, RRR and expected gradients on confounded data (no download):
ColorDigits, DecoyDigits (scikit-learn's digits) and DecoyText (generated sentences).

For each data set, method, lambda and seed, train the demo model with ``loss = cross_entropy +
lambda * penalty`` on the training split, whose confound reveals the label; measure accuracy on
the validation split (held-out examples with the *test-time* confound: random decoy / colour /
decoy word) and on the test split (confound randomised), and the CD share of the penalised
features. For every method lambda is **selected on validation accuracy** (the mean over seeds;
lambda = 0, vanilla training, is in every grid) and test accuracy is reported at it. Writes
``docs/cdep_results.md`` (tables) and ``docs/cdep_results.png`` (plot).

    nice .venv/bin/python examples/cdep_demo.py --runs runs.jsonl   # defaults below (~1.5 h on a loaded 2-core CPU)
    nice .venv/bin/python examples/cdep_demo.py --seeds 0 --epochs 2 --demos decoy   # a quick look

Methods (masks as for CDEP: the decoy band, 2 single foreground pixels per example, the decoy
word): ``cdep`` (``CDEPPenalty`` / ``TextCDEPPenalty``), ``rrr`` (``RRRPenalty``, the CDEP
repository's ``gradient_sum``: squared input gradients of the labels' log-likelihood; on the
word vectors for text), ``eg`` (``ExpectedGradientsPenalty``, the repository's
``eg_scores_2d`` with ``--eg-samples`` references per example, on the word vectors for text).
Deterministic: a rerun gives the same numbers (up to thread-count rounding).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastacd import ExpectedGradientsPenalty, RRRPenalty, cdep  # noqa: E402
from fastacd.text.sentiment_toy import SentimentLSTM  # noqa: E402
from fastacd.train.datasets import ColorDigits, DecoyDigits, DecoyText, DemoCNN  # noqa: E402

NAMES = {"color": "ColorDigits", "decoy": "DecoyDigits", "text": "DecoyText (LSTM)"}
METHODS = {"vanilla": "vanilla", "rrr": "RRR", "eg": "expected gradients", "cdep": "CDEP"}
# lambda grids per data set and method, spanning "no effect" to "the penalty dominates" (the
# penalties' scales differ by orders of magnitude: RRR's mean log-likelihood gradient is ~1e-6)
GRIDS = {
    "color": {"rrr": [1e6, 1e7, 1e8], "eg": [0.3, 1.0, 10.0, 100.0], "cdep": [30.0, 100.0, 300.0]},
    "decoy": {"rrr": [1e3, 1e4, 1e5, 1e6], "eg": [0.01, 0.1, 1.0, 10.0], "cdep": [30.0, 100.0, 300.0]},
    "text": {"rrr": [1e4, 1e5, 1e6], "eg": [0.01, 0.1, 1.0, 10.0], "cdep": [10.0, 100.0]},
}


def masks_for(data, idx, demo: str, pixels: int, g: torch.Generator):
    if demo == "decoy":
        return data.masks[idx]
    return cdep.pixel_masks(len(idx), pixels, (28, 28), prob=data.foreground[idx].double(), generator=g)


def _data(demo: str, split: str, seed: int, style: str, confound=None):
    if demo == "decoy":
        return DecoyDigits(split, seed, style=style, confound=confound)
    return ColorDigits(split, seed, confound=confound)


def _accuracy(model, data) -> float:
    with torch.no_grad():
        return (model(data.x).argmax(1) == data.y).float().mean().item()


def _penalty(method: str, model, g: torch.Generator, eg_samples: int, text: bool = False):
    embed = {"embed": model.embed} if text else {}
    if method == "cdep":
        return cdep.TextCDEPPenalty(model) if text else cdep.CDEPPenalty(model)
    if method == "rrr":
        return RRRPenalty(model, **embed)
    return ExpectedGradientsPenalty(model, samples=eg_samples, generator=g, **embed)


def train(demo: str, method: str, lam: float, seed: int, args):
    tr = _data(demo, "train", seed, args.decoy_style)
    val, val_train, te = (_data(demo, "val", seed, args.decoy_style),
                          _data(demo, "val", seed, args.decoy_style, "train"),
                          _data(demo, "test", seed, args.decoy_style))
    torch.manual_seed(seed)
    model = DemoCNN(in_channels=tr.x.shape[1], width=args.width)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    pen = _penalty(method, model, g, args.eg_samples) if lam else None
    if method == "cdep" and lam:  # compile the fused kernels outside the timing, on a copy
        import copy
        warm = copy.deepcopy(model)
        for n in (64, len(tr) % 64 or 64):
            idx = torch.arange(n)
            cdep.CDEPPenalty(warm).forward_with_penalty(tr.x[idx], masks_for(tr, idx, demo, args.pixels,
                                                                            torch.Generator()))[1].backward()
    start = time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(len(tr), generator=g)
        for s in range(0, len(tr), 64):
            idx = perm[s:s + 64]
            x, y = tr.x[idx], tr.y[idx]
            opt.zero_grad()
            if lam:
                masks = masks_for(tr, idx, demo, args.pixels, g)
                # DemoCNN has no dropout or batchnorm: the penalty's forward is the training forward
                if method == "cdep":
                    logits, p = pen.forward_with_penalty(x, masks)
                else:
                    logits, p = pen.forward_with_penalty(x, masks, y)
                loss = F.cross_entropy(logits, y) + lam * p
            else:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    share = _cd_share(model, te, demo, args.pixels, g)
    return {"demo": demo, "method": method, "lam": lam, "seed": seed, "val_acc": _accuracy(model, val),
            "val_train_confound_acc": _accuracy(model, val_train), "acc": _accuracy(model, te),
            "share": share, "seconds": round(seconds, 1)}


def _cd_share(model, te, demo, pixels, g) -> float:
    """Mean |relevant| / (|relevant| + |irrelevant|) of the true class's logit (CD) for the
    penalised features on test data: how much the model uses them, whatever trained it."""
    with torch.no_grad():
        idx = torch.arange(min(300, len(te)))
        rel, irrel, _ = cdep.CDEPPenalty(model, reuse_forward=False).scores(
            te.x[idx], masks_for(te, idx, demo, pixels, g))
        y = te.y[idx].expand(rel.shape[0], -1)[..., None]
        r, i = rel.gather(2, y).abs(), irrel.gather(2, y).abs()
        return (r / (r + i + 1e-12)).mean().item()


def train_text(method: str, lam: float, seed: int, args, bs: int = 64):
    """The toy sentiment LSTM on DecoyText: 2000 training sentences whose decoy word reveals
    the label; validation (300) and test (1000) sentences with a random decoy."""
    tr, val = DecoyText("train", 2000, seed), DecoyText("val", 300, seed)
    val_train, te = DecoyText("val", 300, seed, confound="train"), DecoyText("test", 1000, seed)
    torch.manual_seed(seed)
    model = SentimentLSTM(vocab_size=len(tr.vocab))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(seed)
    pen = _penalty(method, model, g, args.eg_samples, text=True) if lam else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    start = time.perf_counter()
    try:
        for _ in range(args.text_steps):
            i = torch.randint(0, len(tr), (bs,), generator=g)
            tokens, masks, y = tr.tokens[:, i], tr.masks[i], tr.y[i]
            opt.zero_grad()
            if lam:
                logits, p = pen.forward_with_penalty(tokens, masks, y)
                loss = F.cross_entropy(logits, y) + lam * p
            else:
                loss = F.cross_entropy(model(tokens), y)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    acc = lambda d: (model(d.tokens).argmax(1) == d.y).float().mean().item()
    with torch.no_grad():
        rel, irrel, _ = cdep.TextCDEPPenalty(model).scores(te.tokens, te.masks)
        y = te.y[:, None]
        r, i = rel[0].gather(1, y).abs(), irrel[0].gather(1, y).abs()
        share = (r / (r + i)).mean().item()
        # how often the prediction follows the decoy word (test decoys are random)
        follows = (model(te.tokens).argmax(1) == (te.tokens.T.gather(1, te.decoy_pos[:, None])[:, 0]
                                                    == te.decoy_ids[1]).long()).float().mean().item()
        return {"demo": "text", "method": method, "lam": lam, "seed": seed, "val_acc": acc(val),
                "val_train_confound_acc": acc(val_train), "acc": acc(te), "share": share,
                "follows_decoy": follows, "seconds": round(seconds, 1)}


def _sd(v):
    return statistics.stdev(v) if len(v) > 1 else 0.0


def summarise(rows):
    """Mean and spread over seeds per (data set, method, lambda); vanilla runs (lambda = 0)
    count for every method."""
    groups = {}
    for r in rows:
        groups.setdefault((r["demo"], r["method"], r["lam"]), []).append(r)
    table = []
    for (demo, method, lam), rs in groups.items():
        accs, vals = [r["acc"] * 100 for r in rs], [r["val_acc"] * 100 for r in rs]
        table.append({"demo": demo, "method": method, "lam": lam, "n": len(rs), "seeds": [r["seed"] for r in rs],
                      "val_mean": statistics.mean(vals), "val_sd": _sd(vals),
                      "val_train_mean": statistics.mean(r["val_train_confound_acc"] * 100 for r in rs),
                      "acc_mean": statistics.mean(accs), "acc_sd": _sd(accs),
                      "acc_min": min(accs), "acc_max": max(accs), "accs": accs,
                      "share_mean": statistics.mean(r["share"] for r in rs),
                      "sec_per_run": statistics.mean(r["seconds"] for r in rs)})
    order = {m: i for i, m in enumerate(METHODS)}
    table.sort(key=lambda t: (list(NAMES).index(t["demo"]), order[t["method"]], t["lam"]))
    return table


def select(table, rows):
    """Per data set and method: the lambda (0 included) with the best mean validation accuracy
    and its test accuracy; and lambda selected per seed (each seed's best validation run)."""
    picks = {}
    for demo in dict.fromkeys(t["demo"] for t in table):
        base = next((t for t in table if t["demo"] == demo and t["method"] == "vanilla"), None)
        for method in METHODS:
            ts = [t for t in table if t["demo"] == demo and t["method"] == method]
            if method != "vanilla":
                if not ts:
                    continue
                ts = ts + ([base] if base else [])
            if not ts:
                continue
            best = max(ts, key=lambda t: (t["val_mean"], -t["lam"]))
            per_seed = []
            for seed in sorted({r["seed"] for r in rows if r["demo"] == demo}):
                rs = [r for r in rows if r["demo"] == demo and r["seed"] == seed
                      and (r["method"] == method or r["method"] == "vanilla")]
                if rs:
                    b = max(rs, key=lambda r: (r["val_acc"], -r["lam"]))
                    per_seed.append({"seed": seed, "lam": b["lam"], "acc": b["acc"] * 100})
            accs = [p["acc"] for p in per_seed]
            picks[(demo, method)] = {"lam": best["lam"], "acc_mean": best["acc_mean"], "acc_sd": best["acc_sd"],
                                     "accs": best["accs"], "val_mean": best["val_mean"],
                                     "share": best["share_mean"], "per_seed": per_seed,
                                     "per_seed_acc_mean": statistics.mean(accs), "per_seed_acc_sd": _sd(accs)}
    return picks


def _shown_args() -> str:
    """The command line without --out / --runs (where results go, not what they are)."""
    shown, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a in ("--out", "--runs"):
            skip = True
        elif not a.startswith(("--out=", "--runs=")):
            shown.append(a)
    return " ".join(shown)


def write(table, picks, rows, args, out_dir: Path, seconds: float):
    out_dir.mkdir(parents=True, exist_ok=True)
    demos = list(dict.fromkeys(t["demo"] for t in table))
    lines = ["# CDEP demo results: CDEP, RRR and expected gradients", "",
             f"Produced by `{' '.join(['examples/cdep_demo.py', _shown_args()]).strip()}` ({sum(r['seconds'] for r in rows) / 60:.0f} min "
             "of training in all, one run at a time on a shared 2-core CPU; "
             f"seeds {args.seeds}; images: DemoCNN width {args.width}, {args.epochs} epochs of 1000 digits, "
             f"Adam 3e-3, batch 64, DecoyDigits style `{args.decoy_style}`, ColorDigits {args.pixels} "
             f"single-pixel masks per example, 200 validation / 597 test digits; text: the toy sentiment "
             f"LSTM, {args.text_steps} Adam steps (lr 0.02, batch 64) on 2000 sentences, 300 validation / "
             f"1000 test sentences; expected gradients with {args.eg_samples} reference(s) per example).", "",
             "Validation and test data have the confound randomised (the test-time confound); for every "
             "method lambda is selected on mean validation accuracy over the seeds (lambda = 0, vanilla "
             "training, is in every grid, so a method may select it), test accuracy is reported at the "
             "selected lambda as mean ± sd over the seeds, with each seed's value. CD share: mean "
             "|relevant| / (|relevant| + |irrelevant|) of the true class's logit for the penalised features "
             "(decoy band; single pixels; decoy word) on test data, the model's reliance on them as CD sees "
             "it, whatever penalty trained the model.", "",
             "Scaled down to fit a shared 2-core CPU (the CDEP paper trains on 60,000 MNIST images or the "
             "SST corpus, with 5 seeds, and its expected gradients use 50-200 references per image): 1000 "
             "training digits, 4 epochs, 3 seeds, 1 expected-gradients reference per example (an unbiased "
             "but noisy estimate, as in Erion et al.'s training), lambda grids of 2-4 values per method. "
             "Treat differences within the spread over seeds as ties.", "",
             "## Test accuracy at the lambda selected on validation (%)", "",
             "| data set | " + " | ".join(METHODS.values()) + " |",
             "|---|" + "---|" * len(METHODS)]
    for demo in demos:
        cells = []
        for method in METHODS:
            p = picks.get((demo, method))
            if p is None:
                cells.append("-")
                continue
            lam = "" if method == "vanilla" else f" (λ={p['lam']:g})"
            cells.append(f"{p['acc_mean']:.1f} ± {p['acc_sd']:.1f}{lam}")
        best = max((m for m in METHODS if (demo, m) in picks), key=lambda m: picks[(demo, m)]["acc_mean"])
        cells = [f"**{c}**" if m == best else c for c, m in zip(cells, METHODS)]
        lines.append(f"| {NAMES[demo]} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (test %, at the lambda selected over all seeds) and lambda selected per seed:", "",
              "| data set | method | selected λ | test % per seed | λ selected per seed | test % then (mean ± sd) "
              "| CD share |", "|---|---|---|---|---|---|---|"]
    for demo in demos:
        for method in METHODS:
            p = picks.get((demo, method))
            if p is None:
                continue
            lams = ", ".join(f"{q['lam']:g}" for q in p["per_seed"])
            lines.append(f"| {NAMES[demo]} | {METHODS[method]} | {p['lam']:g} | "
                         f"{', '.join(f'{a:.1f}' for a in p['accs'])} | {lams} | "
                         f"{p['per_seed_acc_mean']:.1f} ± {p['per_seed_acc_sd']:.1f} | {p['share']:.3f} |")
    lines += ["", "## All runs (mean over seeds)", "",
              "| data set | method | λ | seeds | val % (mean ± sd) | val (train confound) % | test % (mean ± sd) "
              "| test min - max | CD share | s / run |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {NAMES[t['demo']]} | {METHODS[t['method']]} | {t['lam']:g} | {t['n']} "
                     f"| {t['val_mean']:.1f} ± {t['val_sd']:.1f} | {t['val_train_mean']:.1f} "
                     f"| {t['acc_mean']:.1f} ± {t['acc_sd']:.1f} | {t['acc_min']:.1f} - {t['acc_max']:.1f} "
                     f"| {t['share_mean']:.3f} | {t['sec_per_run']:.0f} |")
    lines += ["", "Per run (one JSON object a line):", "", "```"] + \
        [json.dumps({k: v for k, v in r.items() if k != "settings"}) for r in rows] + ["```", ""]
    (out_dir / "cdep_results.md").write_text("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(demos), figsize=(4.0 * len(demos), 3.4), squeeze=False)
    colors = {"vanilla": "#999999", "rrr": "#dd8844", "eg": "#66aa66", "cdep": "#3366cc"}
    for ax, demo in zip(axes[0], demos):
        ms = [m for m in METHODS if (demo, m) in picks]
        for j, m in enumerate(ms):
            p = picks[(demo, m)]
            ax.bar(j, p["acc_mean"], 0.6, yerr=p["acc_sd"], capsize=3, color=colors[m])
            ax.plot([j] * len(p["accs"]), p["accs"], "k.", ms=4)
        ax.set_xticks(range(len(ms)), [METHODS[m] + ("" if m == "vanilla" else f"\nλ={picks[(demo, m)]['lam']:g}")
                                       for m in ms], fontsize=7)
        ax.set_ylabel("test accuracy % (confound randomised)")
        ax.set_title(f"{NAMES[demo]}: λ selected on validation", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "cdep_results.png", dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demos", nargs="+", choices=list(NAMES), default=list(NAMES))
    ap.add_argument("--methods", nargs="+", choices=[m for m in METHODS if m != "vanilla"],
                    default=["rrr", "eg", "cdep"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--text-steps", type=int, default=300)
    ap.add_argument("--eg-samples", type=int, default=1, help="expected-gradients references per example")
    ap.add_argument("--decoy-style", choices=DecoyDigits.STYLES, default="band")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--pixels", type=int, default=2, help="single-pixel masks per example (ColorDigits)")
    ap.add_argument("--grid", action="append", default=[], metavar="DEMO:METHOD=L1,L2",
                    help="replace a lambda grid, e.g. decoy:cdep=30,100")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--runs", type=Path, default=None,
                    help="JSON-lines file of finished runs: runs in it with the same settings are reused, "
                         "new ones appended (a long sweep can be resumed or extended)")
    args = ap.parse_args(argv)
    grids = {d: dict(v) for d, v in GRIDS.items()}
    for spec in args.grid:
        key, vals = spec.split("=")
        demo, method = key.split(":")
        grids[demo][method] = [float(v) for v in vals.split(",")]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    settings = {k: getattr(args, k) for k in ("epochs", "text_steps", "eg_samples", "decoy_style", "width", "pixels")}
    done = {}
    if args.runs is not None and args.runs.exists():
        for line in args.runs.read_text().splitlines():
            r = json.loads(line)
            if all(r.get("settings", {}).get(k) == v for k, v in settings.items()):
                done[(r["demo"], r["method"], r["lam"], r["seed"])] = r
    rows = []
    start = time.perf_counter()
    for demo in args.demos:
        runs = [("vanilla", 0.0)] + [(m, lam) for m in args.methods for lam in grids[demo][m]]
        for method, lam in runs:
            for seed in args.seeds:
                r = done.get((demo, method, lam, seed))
                if r is None:
                    r = train_text(method, lam, seed, args) if demo == "text" else train(demo, method, lam, seed, args)
                    r["settings"] = settings
                    if args.runs is not None:
                        with args.runs.open("a") as f:
                            f.write(json.dumps(r) + "\n")
                print(json.dumps(r), flush=True)
                rows.append(r)
    table = summarise(rows)
    picks = select(table, rows)
    write(table, picks, rows, args, args.out, time.perf_counter() - start)
    for (demo, method), p in picks.items():
        print(f"{NAMES[demo]:18s} {METHODS[method]:20s} lambda {p['lam']:<8g} test {p['acc_mean']:.1f} ± {p['acc_sd']:.1f}")


if __name__ == "__main__":
    main()
