"""Opcode counts per kernel from `cuobjdump -sass` (no GPU needed).

    cuobjdump -sass trak_fast/_C.so > sass.txt   # or a .cubin from nvcc -cubin
    python benchmarks/sass_stats.py sass.txt [--filter Bf16] [--ops HMMA,LDG,STG,...]

For each kernel (demangled name shortened) prints the static count of each opcode family
(the text before the first '.', e.g. LDG.E.128 -> LDG), and the longest run of a pattern the
flush review asked about: an LDG whose result is consumed by the very next instruction.
Static counts are per kernel body (loops counted once), which is what the notes compare.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter

DEFAULT_OPS = "HMMA,LDG,STG,LD,ST,LDS,STS,LDSM,MOVM,LDL,STL,FADD,FFMA,IMAD,LOP3,SHF,PRMT,BRA,BAR"
INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*([^;]*);")


def short_name(mangled: str) -> str:
    try:
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    except Exception:
        name = mangled
    name = name.replace("trak_fast::(anonymous namespace)::", "").replace("(anonymous namespace)::", "")
    name = re.sub(r"\(trak_fast::Params<.*$", "", name)
    name = name.replace("Tile<(Math)0, 8, 1>", "SimtFp32").replace("Tile<(Math)1, 4, 2>", "Tf32Large")
    name = name.replace("Tile<(Math)1, 2, 2>", "Tf32Small").replace("Tile<(Math)2, 2, 4>", "Bf16Large")
    name = name.replace("Tile<(Math)2, 1, 4>", "Bf16Small")
    return name


def parse(text: str):
    kernels = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            kernels[current] = []
            continue
        if current is None:
            continue
        m = INSN.search(line)
        if m:
            kernels[current].append((m.group(2), (m.group(3) or ""), m.group(4)))
    return kernels


def ldg_consumed_next(insns) -> int:
    """LDGs whose destination register is read by the next instruction (no latency hidden)."""
    count = 0
    for (op, _mod, args), (_op2, _m2, args2) in zip(insns, insns[1:]):
        if op != "LDG":
            continue
        dest = args.split(",")[0].strip()
        base = re.match(r"R(\d+)", dest)
        if base and re.search(r"\bR%s\b" % base.group(1), args2):
            count += 1
    return count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("sass")
    ap.add_argument("--filter", default="")
    ap.add_argument("--ops", default=DEFAULT_OPS)
    args = ap.parse_args(argv)
    kernels = parse(open(args.sass).read())
    ops = args.ops.split(",")
    print("| kernel | total | " + " | ".join(ops) + " | LDG->use next |")
    print("|---" * (len(ops) + 3) + "|")
    for mangled, insns in kernels.items():
        name = short_name(mangled)
        if args.filter and args.filter not in name:
            continue
        c = Counter(op for op, _m, _a in insns)
        print(f"| {name} | {len(insns)} | " + " | ".join(str(c.get(o, 0)) for o in ops)
              + f" | {ldg_consumed_next(insns)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
