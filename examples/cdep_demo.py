"""CDEP demos on scikit-learn's digits (no download): DecoyDigits and ColorDigits.

For each demo, each lambda and each seed, train ``DemoCNN`` on the training split (1000
digits) with ``loss = cross_entropy + lambda * cdep_penalty``; measure accuracy on the
validation split (200 held-out digits with the *test-time* confound: random decoy / colour)
and on the test split (597 digits, confound randomised), and the CD share of the
penalised features. lambda is **selected on validation accuracy** (the mean over seeds)
and test accuracy is reported at the selected lambda; lambda = 0 is always in the grid.
Writes ``docs/cdep_results.md`` (tables) and ``docs/cdep_results.png`` (plot).

    nice .venv/bin/python examples/cdep_demo.py                 # defaults below
    nice .venv/bin/python examples/cdep_demo.py --seeds 0 1 2 --epochs 4 \\
        --decoy-lambdas 0 30 100 300 --color-lambdas 0 30 100 --text-lambdas 0 100

DecoyDigits masks: each example's decoy band. ColorDigits masks: ``--pixels`` single
foreground pixels per example (colour is present in every single pixel; shape is not).
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

from fastacd import cdep  # noqa: E402
from fastacd.train.datasets import ColorDigits, DecoyDigits, DecoyText, DemoCNN  # noqa: E402
from fastacd.text.sentiment_toy import SentimentLSTM  # noqa: E402

NAMES = {"decoy": "DecoyDigits", "color": "ColorDigits", "text": "DecoyText (LSTM)"}


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


def train(demo: str, lam: float, seed: int, epochs: int, width: int, pixels: int, bs: int = 64,
          style: str = "band"):
    tr = _data(demo, "train", seed, style)
    val, val_train, te = (_data(demo, "val", seed, style), _data(demo, "val", seed, style, "train"),
                          _data(demo, "test", seed, style))
    torch.manual_seed(seed)
    model = DemoCNN(in_channels=tr.x.shape[1], width=width)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pen = cdep.CDEPPenalty(model)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(tr), generator=g)
        for s in range(0, len(tr), bs):
            idx = perm[s:s + bs]
            opt.zero_grad()
            if lam:
                # the penalty's pass of the true activations is the ordinary forward here
                logits, p = pen.forward_with_penalty(tr.x[idx], masks_for(tr, idx, demo, pixels, g))
                loss = F.cross_entropy(logits, tr.y[idx]) + lam * p
            else:
                loss = F.cross_entropy(model(tr.x[idx]), tr.y[idx])
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        idx = torch.arange(min(300, len(te)))
        rel, irrel, _ = pen.scores(te.x[idx], masks_for(te, idx, demo, pixels, g))
        y = te.y[idx].expand(rel.shape[0], -1)[..., None]
        r, i = rel.gather(2, y).abs(), irrel.gather(2, y).abs()
        share = (r / (r + i + 1e-12)).mean().item()
    return {"demo": demo, "lam": lam, "seed": seed, "val_acc": _accuracy(model, val),
            "val_train_confound_acc": _accuracy(model, val_train), "acc": _accuracy(model, te),
            "share": share, "seconds": seconds}


def train_text(lam: float, seed: int, steps: int, bs: int = 64):
    """The toy sentiment LSTM on DecoyText: 2000 training sentences whose decoy word reveals
    the label; validation (300) and test (1000) sentences with a random decoy."""
    tr, val = DecoyText("train", 2000, seed), DecoyText("val", 300, seed)
    val_train, te = DecoyText("val", 300, seed, confound="train"), DecoyText("test", 1000, seed)
    torch.manual_seed(seed)
    model = SentimentLSTM(vocab_size=len(tr.vocab))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    pen = cdep.TextCDEPPenalty(model)
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    start = time.perf_counter()
    try:
        for _ in range(steps):
            i = torch.randint(0, len(tr), (bs,), generator=g)
            opt.zero_grad()
            if lam:
                logits, p = pen.forward_with_penalty(tr.tokens[:, i], tr.masks[i], tr.y[i])
                loss = F.cross_entropy(logits, tr.y[i]) + lam * p
            else:
                loss = F.cross_entropy(model(tr.tokens[:, i]), tr.y[i])
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    acc = lambda d: (model(d.tokens).argmax(1) == d.y).float().mean().item()
    with torch.no_grad():
        rel, irrel, _ = pen.scores(te.tokens, te.masks)
        y = te.y[:, None]
        r, i = rel[0].gather(1, y).abs(), irrel[0].gather(1, y).abs()
        share = (r / (r + i)).mean().item()
        # how often the prediction follows the decoy word (test decoys are random)
        follows = (model(te.tokens).argmax(1) == (te.tokens.T.gather(1, te.decoy_pos[:, None])[:, 0]
                                                    == te.decoy_ids[1]).long()).float().mean().item()
        return {"demo": "text", "lam": lam, "seed": seed, "val_acc": acc(val),
                "val_train_confound_acc": acc(val_train), "acc": acc(te), "share": share,
                "follows_decoy": follows, "seconds": seconds}


def _sd(v):
    return statistics.stdev(v) if len(v) > 1 else 0.0


def summarise(rows):
    out = {}
    for r in rows:
        out.setdefault((r["demo"], r["lam"]), []).append(r)
    table = []
    for (demo, lam), rs in sorted(out.items()):
        accs = [r["acc"] * 100 for r in rs]
        vals = [r["val_acc"] * 100 for r in rs]
        table.append({"demo": demo, "lam": lam, "n": len(rs),
                      "val_mean": statistics.mean(vals), "val_sd": _sd(vals),
                      "val_train_mean": statistics.mean(r["val_train_confound_acc"] * 100 for r in rs),
                      "acc_mean": statistics.mean(accs), "acc_sd": _sd(accs),
                      "acc_min": min(accs), "acc_max": max(accs),
                      "share_mean": statistics.mean(r["share"] for r in rs),
                      "sec_per_run": statistics.mean(r["seconds"] for r in rs)})
    return table


def select(table, rows):
    """Per demo: lambda with the best mean validation accuracy, its test accuracy; and
    lambda selected per seed (each seed's best validation run), the test accuracy of those."""
    picks = {}
    for demo in dict.fromkeys(t["demo"] for t in table):
        ts = [t for t in table if t["demo"] == demo]
        best = max(ts, key=lambda t: (t["val_mean"], -t["lam"]))
        base = next(t for t in ts if t["lam"] == 0) if any(t["lam"] == 0 for t in ts) else None
        per_seed = []
        for seed in sorted({r["seed"] for r in rows if r["demo"] == demo}):
            rs = [r for r in rows if r["demo"] == demo and r["seed"] == seed]
            b = max(rs, key=lambda r: (r["val_acc"], -r["lam"]))
            per_seed.append({"seed": seed, "lam": b["lam"], "acc": b["acc"] * 100})
        accs = [p["acc"] for p in per_seed]
        picks[demo] = {"lam": best["lam"], "acc_mean": best["acc_mean"], "acc_sd": best["acc_sd"],
                       "val_mean": best["val_mean"], "base": base, "per_seed": per_seed,
                       "per_seed_acc_mean": statistics.mean(accs), "per_seed_acc_sd": _sd(accs)}
    return picks


def write(table, picks, rows, args, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# CDEP demo results", "",
             f"Produced by `examples/cdep_demo.py {' '.join(sys.argv[1:])}` "
             f"(DemoCNN width {args.width}, {args.epochs} epochs, Adam 3e-3, batch 64, "
             f"DecoyDigits style `{args.decoy_style}`, ColorDigits {args.pixels} single-pixel masks "
             f"per example; 1000 train / 200 validation / 597 test digits; seeds {args.seeds}).", "",
             "Validation and test data have the confound randomised (the test-time confound); lambda is "
             "selected on validation accuracy, test accuracy is reported at the selected lambda. "
             "`val (train confound)`: the same validation digits with the training confound, for "
             "comparison (selecting on it would always favour the confounded model). CD share: mean "
             "|relevant| / (|relevant| + |irrelevant|) of the true class's logit for the penalised "
             "features (decoy band; single pixels; decoy word) on test data. DecoyText: the toy "
             f"sentiment LSTM, {args.text_steps} Adam steps (lr 0.02, batch 64) on 2000 sentences, "
             "300 validation / 1000 test sentences with a random decoy word.", "",
             "## Selected lambda", "",
             "| data set | lambda = 0: test % (mean ± sd) | selected lambda (validation) | test % at it (mean ± sd) "
             "| lambda selected per seed: test % (mean ± sd) | lambdas per seed |",
             "|---|---|---|---|---|---|"]
    for demo, p in picks.items():
        base = p["base"]
        b = f"{base['acc_mean']:.1f} ± {base['acc_sd']:.1f}" if base else "-"
        lams = ", ".join(f"{q['lam']:g}" for q in p["per_seed"])
        lines.append(f"| {NAMES[demo]} | {b} | {p['lam']:g} | **{p['acc_mean']:.1f} ± {p['acc_sd']:.1f}** "
                     f"| {p['per_seed_acc_mean']:.1f} ± {p['per_seed_acc_sd']:.1f} "
                     f"| {lams} |")
    lines += ["", "## All runs (mean over seeds)", "",
              "| data set | lambda | seeds | val % (mean ± sd) | val (train confound) % | test % (mean ± sd) "
              "| test min - max | CD share | s / run |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {NAMES[t['demo']]} | {t['lam']:g} | {t['n']} | {t['val_mean']:.1f} ± {t['val_sd']:.1f} "
                     f"| {t['val_train_mean']:.1f} | {t['acc_mean']:.1f} ± {t['acc_sd']:.1f} "
                     f"| {t['acc_min']:.1f} - {t['acc_max']:.1f} | {t['share_mean']:.3f} | {t['sec_per_run']:.0f} |")
    lines += ["", "Per run:", "", "```json", json.dumps(rows, indent=0), "```", ""]
    (out_dir / "cdep_results.md").write_text("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    demos = list(picks)
    fig, axes = plt.subplots(1, len(demos), figsize=(4.2 * len(demos), 3.4), squeeze=False)
    for ax, demo in zip(axes[0], demos):
        ts = [t for t in table if t["demo"] == demo]
        xs = list(range(len(ts)))
        w = 0.38
        ax.bar([x - w / 2 for x in xs], [t["val_mean"] for t in ts], w, yerr=[t["val_sd"] for t in ts],
               capsize=3, color="#bbbbbb", label="validation")
        colors = ["#3366cc" if t["lam"] == picks[demo]["lam"] else "#99aadd" for t in ts]
        ax.bar([x + w / 2 for x in xs], [t["acc_mean"] for t in ts], w, yerr=[t["acc_sd"] for t in ts],
               capsize=3, color=colors, label="test")
        for r in rows:
            if r["demo"] == demo:
                j = [t["lam"] for t in ts].index(r["lam"])
                ax.plot(j + w / 2, r["acc"] * 100, "k.", ms=3)
        ax.set_xticks(xs, [f"λ={t['lam']:g}" + ("*" if t["lam"] == picks[demo]["lam"] else "") for t in ts])
        ax.set_ylabel("accuracy % (confound randomised)")
        ax.set_title(f"{NAMES[demo]} (* = selected on validation)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "cdep_results.png", dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--decoy-lambdas", type=float, nargs="*", default=[0.0, 30.0, 100.0, 300.0])
    ap.add_argument("--color-lambdas", type=float, nargs="*", default=[0.0, 30.0, 100.0])
    ap.add_argument("--text-lambdas", type=float, nargs="*", default=[0.0, 100.0])
    ap.add_argument("--text-steps", type=int, default=300)
    ap.add_argument("--decoy-style", choices=DecoyDigits.STYLES, default="band")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--pixels", type=int, default=2, help="single-pixel masks per example (ColorDigits)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    for demo, lams in (("decoy", args.decoy_lambdas), ("color", args.color_lambdas),
                       ("text", args.text_lambdas)):
        for lam in lams:
            for seed in args.seeds:
                if demo == "text":
                    r = train_text(lam, seed, args.text_steps)
                else:
                    r = train(demo, lam, seed, args.epochs, args.width, args.pixels, style=args.decoy_style)
                print(json.dumps(r), flush=True)
                rows.append(r)
    table = summarise(rows)
    picks = select(table, rows)
    write(table, picks, rows, args, args.out)
    for t in table:
        print(t)
    print(json.dumps(picks, indent=1))


if __name__ == "__main__":
    main()
