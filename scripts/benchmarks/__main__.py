"""``python -m scripts.benchmarks <name> [options]``: run one benchmark (``--help`` per benchmark)."""

from __future__ import annotations

import sys

from scripts.benchmarks import denormal, evaluate, extract, fusion, gpu_table, infer, loader, read, scaling, stain, startup, tasks, train

BENCHMARKS = {"read": read.main, "extract": extract.main, "infer": infer.main, "train": train.main, "evaluate": evaluate.main, "scaling": scaling.main,
              "fusion": fusion.main, "startup": startup.main, "loader": loader.main,
              "tasks": tasks.main, "gpu_table": gpu_table.main, "stain": stain.main, "denormal": denormal.main}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        sys.stderr.write(f"usage: python -m scripts.benchmarks <{'|'.join(BENCHMARKS)}> [options]\n")
        raise SystemExit(2)
    BENCHMARKS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
