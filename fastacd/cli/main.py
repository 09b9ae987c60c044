"""The ``fastacd`` command: ``demo``, ``run``, ``info``, ``bench`` (argument parsing only;
the work is in ``fastacd.cli.run``)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ..api import build_info
from .run import RunError, demo, run

RUN_EXAMPLES = """\
examples:
  # every image of an ImageFolder tree (root/class/img.png), torchvision VGG16 with local weights
  fastacd run data/val --arch vgg16 --weights vgg16.pth --out acd_val --label folder --figures

  # your own model: a module:factory returning an nn.Module (or file.py:factory)
  fastacd run 'photos/*.jpg' --model mypkg.nets:build --image-size 64 --out acd_photos

  # a text file listing image paths; explain class 207 in every image
  fastacd run list.txt --arch resnet18 --weights r18.pth --label 207 --out acd_207

  # several processes (one per GPU, or CPU cores split between them), one or more nodes
  torchrun --nproc_per_node=4 -m fastacd run data/val --arch vgg16 --weights vgg16.pth --out acd_val

Re-running the same command resumes: finished images are skipped. Changing a setting with the
same --out is refused unless --overwrite. Outputs, schema and resume rules: docs/run.md.
"""


def cmd_demo(args) -> int:
    try:
        return demo(args.out, n=args.n, sweep_dim=args.sweep_dim, percentile_include=args.percentile_include,
                    num_iters=args.num_iters, tile=args.tile, threads=args.threads or None)
    except RunError as e:
        print(f"fastacd demo: error: {e}", file=sys.stderr)
        return 2


def cmd_run(args) -> int:
    try:
        return run(args)
    except RunError as e:
        print(f"fastacd run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfastacd run: interrupted; finished images are kept: re-run the same command to resume",
              file=sys.stderr)
        return 130


def cmd_info(args) -> int:
    print(json.dumps(build_info(), indent=2, default=str))
    return 0


def cmd_bench(args) -> int:
    root = Path(__file__).resolve().parents[2]
    bench = root / "bench"
    if not bench.is_dir():
        print("bench/ is not present (the benchmarks ship with the source tree)", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "pytest", str(bench / args.suite) if args.suite else str(bench),
           "-q", "-p", "no:cacheprovider"]
    rc = subprocess.call(cmd, cwd=root)
    subprocess.call([sys.executable, str(bench / "report.py")], cwd=root)
    return rc


def _int_or_label(s: str) -> str:
    if s in ("pred", "folder"):
        return s
    try:
        int(s)
    except ValueError:
        raise argparse.ArgumentTypeError("expected 'pred', 'folder' or a class index") from None
    return s


def add_run_parser(sub) -> argparse.ArgumentParser:
    r = sub.add_parser(
        "run", help="ACD hierarchies for every image of a folder, file list or glob (resumable, torchrun)",
        description="ACD hierarchies for every image of a folder, a file list or a glob: a JSON "
                    "hierarchy, compressed masks (.npz) and optionally a figure per image, and a "
                    "JSONL manifest. Resumable; spreads over processes with torchrun.",
        epilog=RUN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("source", help="a folder (ImageFolder root/class/img.png, or flat; searched "
                   "recursively), a quoted glob ('data/**/*.png'), a text file with one image path "
                   "per line (relative to the list's folder), or one image")
    r.add_argument("--out", required=True, help="output folder (created; re-use it to resume)")

    g = r.add_argument_group("model (one of --arch / --model)")
    g.add_argument("--arch", help="a torchvision classification model by name, e.g. vgg16, alexnet, resnet50; "
                   "or timm:NAME for a timm model, e.g. timm:convnext_tiny (random-init unless --weights)")
    g.add_argument("--model", help="your model: 'package.module:factory' or 'file.py:factory'; the "
                   "factory is called with no arguments and returns an nn.Module (or name a module object)")
    g.add_argument("--weights", help="local weights file (a state_dict, or a checkpoint dict with "
                   "'state_dict' / 'model'), loaded with torch.load(weights_only=True). Without it "
                   "--arch models are random-init (a warning says so); nothing is downloaded")
    g.add_argument("--unsafe-load", action="store_true", help="allow --weights files holding "
                   "arbitrary Python objects (torch.load(weights_only=False) runs code from the "
                   "file: only for files you trust); such a file may also hold a whole nn.Module")
    g.add_argument("--num-classes", type=int, help="for --arch: number of outputs (default: the "
                   "architecture's, 1000 for ImageNet models)")
    g.add_argument("--seed", type=int, default=0, help="seed for random-init weights (default: %(default)s)")

    g = r.add_argument_group("the class to explain")
    g.add_argument("--label", type=_int_or_label, default="pred", help="'pred' (the model's predicted "
                   "class, default), 'folder' (the class of the image's folder, with --class-index or "
                   "the sorted folder names = indices 0, 1, ..., as torchvision's ImageFolder), or a "
                   "fixed class index")
    g.add_argument("--class-index", help="for --label folder: folder name -> index, as JSON "
                   "{name: index}, JSON like imagenet_class_index.json {\"0\": [\"n01440764\", "
                   "\"tench\"]}, or text with one folder name per line (line number = index)")

    g = r.add_argument_group("ACD (defaults: the paper's ImageNet settings)")
    g.add_argument("--sweep-dim", type=int, default=None, help="tile side in pixels (default: "
                   "ceil(image size / 16), 14 at 224; for patch models (ViT, Swin, ConvNeXt: the "
                   "input read by a convolution with kernel = stride) the smallest multiple of the "
                   "patch size at least that, so tiles align to the patch grid: 16 for vit_b_16, "
                   "swin_t, convnext_tiny at 224)")
    g.add_argument("--percentile-include", type=float, default=95, help="selection percentile "
                   "(default: %(default)s)")
    g.add_argument("--num-iters", type=int, default=5, help="growing iterations (default: %(default)s)")
    g.add_argument("--method", choices=("cd", "occlusion", "build_up"), default="cd",
                   help="score (default: %(default)s)")
    g.add_argument("--base", choices=("tiles", "slic", "felzenszwalb"), default="tiles",
                   help="base units: square tiles (the paper) or superpixels (default: %(default)s)")
    g.add_argument("--corrected", action="store_true", help="switch off the original's unintended "
                   "quirks (docs/hierarchies.md)")

    g = r.add_argument_group("preprocessing (torchvision's: resize shorter side, centre crop, normalise)")
    g.add_argument("--image-size", type=int, default=224, help="square crop fed to the model "
                   "(default: %(default)s; 0 = keep each image's own size)")
    g.add_argument("--resize", type=int, default=None, help="shorter side before the crop (default: "
                   "image size x 256/224, i.e. 256 for 224)")
    g.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean per channel "
                   "(default: ImageNet's 0.485 0.456 0.406)")
    g.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std per channel "
                   "(default: ImageNet's 0.229 0.224 0.225)")
    g.add_argument("--grayscale", action="store_true", help="feed one channel (default mean/std 0.5)")

    g = r.add_argument_group("execution")
    g.add_argument("--device", default="auto", help="'auto' (cuda:LOCAL_RANK when CUDA is there, "
                   "else cpu), 'cpu', 'cuda', 'cuda:N' (default: %(default)s)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="model and input dtype (default: %(default)s)")
    g.add_argument("--memory-budget", default=None, help="bytes of activations per engine chunk, "
                   "e.g. 4G (default: 1 GiB on the CPU, half the free memory on a GPU)")
    g.add_argument("--backend", choices=("auto", "compiled", "torch", "reference"), default="auto",
                   help="CD engine backend (default: %(default)s: the fastest built)")
    g.add_argument("--precision", choices=("float32", "bf16", "tf32"), default="float32",
                   help="float32: exact (default); bf16: convolutions, linear layers and attention "
                   "products in bfloat16 (fast on CPUs with AMX and GPUs from Ampere), the splits in "
                   "float32, and the hierarchy's near-tied decisions checked with float32 scores "
                   "(on a CPU that costs what bf16 saves: docs/precision.md); "
                   "tf32: TF32 tensor cores on a GPU for float32 convolutions and matmuls")
    g.add_argument("--tf32", action="store_true", help="the same as --precision tf32")
    g.add_argument("--no-exact-decisions", dest="exact_decisions", action="store_false",
                   help="with --precision bf16 (or tf32 on a GPU): decide the hierarchy from the "
                   "reduced-precision scores alone, without float32 checks of near ties (faster; the "
                   "hierarchy can differ from float32's from the first near tie on)")
    g.add_argument("--zero-tol", type=float, default=None, help="numerical zero: a split's part near "
                   "this fraction of its unit's magnitude counts as zero (default 1e-4; 0: the published "
                   "split formula, the original package's numbers; docs/engine.md)")
    g.add_argument("--rounding-check", choices=("first", "every", "off"), default="first",
                   help="compare up to 4 of an image's node scores with a float64 decomposition "
                   "(Decomposer.rounding_gap; recorded as rounding_gap in its record) on the first image "
                   "each process computes (default), on every image (about +25%% time), or never; warns "
                   "when rounding moves them by over 1e-3 of the largest logit (docs/run.md)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: "
                   "the cores this process may use // processes on this node)")
    g.add_argument("--barrier-timeout", type=float, default=7 * 24 * 3600,
                   help="seconds the ranks wait for each other at the end (default: a week)")

    g = r.add_argument_group("outputs")
    g.add_argument("--figures", action="store_true", help="also write a PNG figure per image")
    g.add_argument("--no-class-scores", action="store_true", help="leave every node's class_scores "
                   "(all classes) out of the JSON; its score for the label stays. With a 1000-class "
                   "model this makes the JSON ~20x smaller")
    g.add_argument("--overwrite", action="store_true", help="accept settings that differ from the "
                   "ones recorded in --out: every image is recomputed with the new settings")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_run)
    return r


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastacd", description="Fast Contextual Decomposition (CD) and ACD hierarchies.",
        epilog="Start with 'fastacd demo' (nothing to download), then 'fastacd run --help'.")
    sub = p.add_subparsers(dest="cmd", metavar="{demo,run,info,bench}")
    d = sub.add_parser("demo", help="train a small digits CNN (seconds), write ACD hierarchies of a few "
                       "test digits (figure + JSON) and time the engine against the reference; no downloads",
                       description="Train a small CNN on scikit-learn's bundled digits, write the ACD "
                       "hierarchy (PNG figure + JSON) of a few test digits, and compare the batched CD "
                       "engine with the reference backend on tile scores.")
    d.add_argument("--out", default="fastacd_demo_out", help="output folder (default: %(default)s)")
    d.add_argument("--n", type=int, default=4, help="digits to explain (default: %(default)s)")
    d.add_argument("--sweep-dim", type=int, default=2, help="hierarchy tile side in pixels of the "
                   "28x28 digit (default: %(default)s)")
    d.add_argument("--percentile-include", type=float, default=90, help="(default: %(default)s)")
    d.add_argument("--num-iters", type=int, default=5, help="(default: %(default)s)")
    d.add_argument("--tile", type=int, default=4, help="tile side for the speed comparison (default: %(default)s)")
    d.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s; the model is "
                   "tiny; 0 = torch's default)")
    d.set_defaults(fn=cmd_demo)
    add_run_parser(sub)
    i = sub.add_parser("info", help="versions, compiled extension and kernels, devices")
    i.set_defaults(fn=cmd_info)
    b = sub.add_parser("bench", help="run the benchmark harness (bench/) and print the ratio table")
    b.add_argument("suite", nargs="?", default=None, help="one file of bench/, e.g. bench_engine.py")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.cmd is None:
        p.print_help()
        return 0
    if args.cmd == "run" and args.image_size == 0:
        args.image_size = None
    return args.fn(args)

