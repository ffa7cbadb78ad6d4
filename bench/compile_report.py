"""Compile every registered Triton kernel config for sm_80 and sm_90 (no GPU needed) and print a table of
registers, spills, shared memory, occupancy (CTAs per SM), tensor-core MMA use and ptxas warnings.

    python bench/compile_report.py [--arch 80 90] [--filter attention] [--json report.json]

Exit status 1 if any build has a problem (gundam.kernels.compile_check.problems): a failed build, spills,
shared memory over the limit, a ptxas performance warning, missing MMA, occupancy below its minimum.
"""
import argparse
import json
import sys
from dataclasses import asdict

from gundam.kernels.compile_check import ARCHS, compile_registered, format_table, problems, registered_configs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities, e.g. 80 90")
    ap.add_argument("--filter", default="", help="only configs whose name contains this")
    ap.add_argument("--json", help="also write the stats (one object per build) to this file")
    args = ap.parse_args()
    entries = {e["name"]: e for e in registered_configs() if args.filter in e["name"]}
    stats = compile_registered(args.arch, list(entries))
    print(format_table(stats))
    bad = [f"{s.name} sm_{s.arch}: {p}" for s in stats for p in problems(s, entries[s.name])]
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(asdict(s), ctas_per_sm=s.ctas_per_sm, problems=problems(s, entries[s.name]))
                       for s in stats], f, indent=1)
    if bad:
        print("\nproblems:\n  " + "\n  ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
