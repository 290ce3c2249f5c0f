"""ML-WGAN-GP data augmentation (the study's per-image WGAN-GP), many per-image GANs trained at once.

    python -m DataAugmentation --data Corel-5k --iterations 1001 [--group-size K] [--limit N] [--device cuda]

models.py  grouped generator / critic (K independent models in grouped convolutions, per-model BatchNorm)
train.py   per-image random streams, gradient penalty, the training loop of one group
files.py   real-image preprocessing, atomic output files, train_aug.json
cli.py     the resumable command line
"""
import sys

if sys.argv[:1] == ["-m"]:  # `python -m DataAugmentation` is being located (Python's rule): a Ctrl-C while torch
    import startup           # loads is one line, not a traceback

    startup.guard()

from .cli import get_args_parser, main, run
from .files import (finished_images, fakes_to_images, load_real_image, output_names, save_outputs,
                    write_train_aug)
from .models import GanConfig, GroupedConv, GroupedCritic, GroupedGenerator, init_group_, upsampling_stages
from .train import (GroupResult, Randomness, critic_loss, draw_randomness, gradient_penalty, image_seed,
                    train_group, train_images)

__all__ = ["GanConfig", "GroupedConv", "GroupedCritic", "GroupedGenerator", "GroupResult", "Randomness",
           "critic_loss", "draw_randomness", "fakes_to_images", "finished_images", "get_args_parser",
           "gradient_penalty", "image_seed", "init_group_", "load_real_image", "main", "output_names", "run",
           "save_outputs", "train_group", "train_images", "upsampling_stages", "write_train_aug"]
