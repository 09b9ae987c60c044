"""Print the ratio table of bench/results/*.json; compare with another results folder.

    python bench/report.py                      # this checkout's results
    python bench/report.py --against OLD_DIR    # side by side with results of another commit
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "results"


def load(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        cases = data.get("cases", data)
        for case, figs in cases.items():
            if isinstance(figs, dict):
                for k, v in figs.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        out[(f.stem, case, k)] = v
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", type=Path, default=HERE)
    p.add_argument("--against", type=Path, default=None)
    a = p.parse_args()
    now = load(a.results)
    old = load(a.against) if a.against else {}
    if not now:
        print(f"no results in {a.results}; run `make bench` first")
        return
    print(f"{'suite':<14} {'case':<34} {'figure':<28} {'value':>10}" + (f" {'before':>10}" if old else ""))
    for key in sorted(now):
        suite, case, fig = key
        line = f"{suite:<14} {case:<34} {fig:<28} {now[key]:>10.4g}"
        if old:
            line += f" {old[key]:>10.4g}" if key in old else f" {'-':>10}"
        print(line)


if __name__ == "__main__":
    main()
