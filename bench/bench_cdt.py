"""A script: CD per mask with the default rule set and with ``cdt`` (CD-T's formulas) on a
random BERT classifier (hidden 128, 4 layers, 4 heads, 32 tokens, 32 one-token masks, float32,
one thread), process CPU time, best of ``--repeat``; over the best plain forward.

    .venv/bin/python bench/bench_cdt.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's fastacd and the test model

import fastacd  # noqa: E402
from test_cdt import BertOnEmbeddings  # noqa: E402


def best(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import transformers
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=512, max_position_embeddings=64, num_labels=2)
    clf = transformers.BertForSequenceClassification(cfg).eval()
    model = BertOnEmbeddings(clf).eval()
    tokens, m = 32, 32
    with torch.no_grad():
        emb = clf.bert.embeddings(input_ids=torch.randint(1, 100, (1, tokens)))
        masks = torch.zeros(m, tokens)
        masks[torch.arange(m), torch.arange(m) % tokens] = 1
        rel_in = masks[:, :, None] * emb
        forward = best(lambda: model(emb), args.repeat)
        print(f"forward {forward * 1e3:.2f} ms (process CPU time, 1 thread)")
        for name in ("acd", "cdt"):
            dec = fastacd.Decomposer(model, rules=name)
            t = best(lambda: dec.cd_relevant_input(emb, rel_in), args.repeat)
            print(f"{name}: CD {t * 1e3:.1f} ms for {m} masks, {t / m * 1e3:.2f} ms per mask, "
                  f"{t / m / forward:.2f} of a forward")


if __name__ == "__main__":
    main()
