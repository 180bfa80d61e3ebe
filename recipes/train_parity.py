"""Train a causal LM on k-sparse parity with the spectral volume penalty and rank/NTK tracking.

Usage:

    accelerate launch recipes/train_parity.py                        # defaults: configs/parity_default.yaml
    accelerate launch recipes/train_parity.py --n_bits 20 --k 3 --output_dir outputs/parity20

Same flags as train_majority.py, with `task` defaulting to parity.
"""

import sys

from train_majority import run

if __name__ == "__main__":
    run("parity", sys.argv[1:])
