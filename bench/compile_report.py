"""Compile every registered Triton kernel config for sm_80 and sm_90 (no GPU needed) and print a table of
registers, spills, shared memory and tensor-core MMA use.

    python bench/compile_report.py [--arch 80 90] [--filter attention]
"""
import argparse
import sys

from gundam.kernels.compile_check import ARCHS, compile_registered, format_table, registered_configs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities, e.g. 80 90")
    ap.add_argument("--filter", default="", help="only configs whose name contains this")
    args = ap.parse_args()
    entries = {e["name"]: e for e in registered_configs() if args.filter in e["name"]}
    stats = compile_registered(args.arch, list(entries))
    print(format_table(stats))
    bad = [f"{s.name} sm_{s.arch}" for s in stats
           if s.error or s.spills or not s.fits_smem or (entries[s.name].get("expect_mma") and not s.has_mma)]
    if bad:
        print("\nproblems (build failure, spills, shared memory over the limit, or missing MMA):\n  " + "\n  ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
