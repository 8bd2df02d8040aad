"""The evaluation section of `robustprune bench`: PGD-20 on the 10 000 MNIST test images with the
MNIST study's CNN (trained one epoch), robustprune's PGD against torchattacks' on the same inputs
in the same run, then the 15 x 5 corruption suite on 10 000 CIFAR-sized images.

    python benchmarks/evaluation_speed.py [--data-dir ../shared/data] [--json figures.json]

Any other `robustprune bench` option may follow (e.g. --eval-images 1000 for a quick look).
"""

from __future__ import annotations

import sys

from robustprune.cli import main

if __name__ == "__main__":
    # the figures are computed and printed by the CLI itself, so the two never disagree
    sys.exit(main(["bench", "--section", "evaluation", *sys.argv[1:]]))
