"""
Runs every compiled op forward and backward once per dtype on small CUDA inputs (odd sizes,
padding, points outside the maps) and compares each with the PyTorch reference, on the
first-use check's cases (`conditional_detr.ops.cases`): the program compute-sanitizer
watches (memcheck, racecheck) in scripts/gpu_checks.sh. Exits 1 when an op disagrees with the reference, 0
otherwise; without a CUDA device it says so and exits 0.

    python scripts/exercise_cuda_ops.py
"""
import os
import sys

import torch

import conditional_detr
from conditional_detr import ops
from conditional_detr.ops import self_check


def main():
    print(f"conditional_detr from {os.path.dirname(conditional_detr.__file__)}")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to exercise")
        return 0
    if not ops.has_ops_for("cuda"):
        print(f"compiled CUDA ops unavailable: {ops.unavailable_reason('cuda')}")
        return 1
    ok = True
    for op in self_check.CHECKED_OPS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            error = self_check.disagreement(op, torch.device("cuda"), dtype)
            print(f"{op:<34} {str(dtype):<15} {error or 'agrees with the reference'}")
            ok &= error is None
    torch.cuda.synchronize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
