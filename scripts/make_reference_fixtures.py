#!/usr/bin/env python
"""
Writes the fixtures the fidelity tests compare with: small seeded random models built and run
by the official implementations, and the key lists of their full-size models, from local
checkouts of the official repositories (imported from there; nothing in them is changed).

    python scripts/make_reference_fixtures.py --conditional-detr ConditionalDETR \\
        --detr detr --deformable-detr Deformable-DETR --output DIR
    CONDITIONAL_DETR_REFERENCE=DIR make test

Checkouts: github.com/Atten4Vis/ConditionalDETR, github.com/facebookresearch/detr,
github.com/fundamentalvision/Deformable-DETR. Any subset may be given: the files of the
others are left out. Runs on the CPU in a few minutes (docs/fidelity.md).
"""
import argparse
import os
import pathlib
import sys
import time

from reference_fixtures import official_conditional_detr, official_deformable_detr, official_detr
from reference_fixtures.common import Progress

# flag -> (module, repository)
REPOSITORIES = {
    "conditional_detr": (official_conditional_detr, "Atten4Vis/ConditionalDETR"),
    "detr": (official_detr, "facebookresearch/detr"),
    "deformable_detr": (official_deformable_detr, "fundamentalvision/Deformable-DETR"),
}


def writer_of(name):
    """(flag, repository) of the checkout whose fixtures include the file `name`."""
    for flag, (module, repository) in REPOSITORIES.items():
        if name in module.FILES:
            return flag.replace("_", "-"), repository
    raise KeyError(f"{name} is not a fixture this script writes")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, (_, repository) in REPOSITORIES.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", metavar="DIR", help=f"a checkout of {repository}")
    parser.add_argument("--output", required=True, metavar="DIR", help="the folder the fixtures are written to")
    args = parser.parse_args(argv)
    checkouts = {flag: getattr(args, flag) for flag in REPOSITORIES if getattr(args, flag)}
    if not checkouts:
        parser.error("give at least one checkout: " + ", ".join(f"--{f.replace('_', '-')}" for f in REPOSITORIES))
    for flag, path in checkouts.items():
        module, repository = REPOSITORIES[flag]
        if not os.path.isfile(os.path.join(path, module.MARKER)):
            parser.error(f"--{flag.replace('_', '-')} {path}: no {module.MARKER} there; expected a checkout of {repository}")
    return checkouts, pathlib.Path(args.output)


def main(argv=None):
    checkouts, output = parse_args(argv)
    output.mkdir(parents=True, exist_ok=True)
    progress = Progress(output)
    for flag, path in checkouts.items():
        module, repository = REPOSITORIES[flag]
        print(f"{repository} ({path}):", flush=True)
        module.make(path, progress)
    print(f"{len(progress.written)} files in {output} ({time.perf_counter() - progress.start:.0f} s); "
          f"the tests read them with CONDITIONAL_DETR_REFERENCE={output}")
    return progress.written


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
