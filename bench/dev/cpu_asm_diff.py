#!/usr/bin/env python3
"""Compares the CPU kernels' machine code in two builds of effattn/_C.abi3.so, function by function.

    python3 bench/dev/cpu_asm_diff.py BEFORE.so AFTER.so [--rename FROM=TO ...] [--show NAME]

It answers "did this change alter the plain kernels' code": each function of effattn::cpu in
BEFORE is matched by its demangled name in AFTER (``--rename`` maps a changed spelling, e.g. a
new defaulted template argument: ``--rename 'FwdTile<(.*?)>::run=FwdTile<\\1, false>::run'``,
regular expressions on AFTER's names) and its instructions compared after removing what moves
with the layout of the library, not with the code: addresses of jump and call targets and
rip-relative offsets of constants. The hot functions (the tiles' run loops and the GEMMs) are
listed one by one; the rest are counted. Build both checkouts at paths of equal length: the
source path is compiled into the check messages, whose length changes the code that builds them.
Uses binutils' objdump.
"""
import argparse
import difflib
import re
import subprocess

HOT = re.compile(r"Tile<.*>::run\(|::gemm<")


def functions(so):
    """{demangled name: [normalised instructions]} of every function in effattn::cpu."""
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so], capture_output=True, text=True,
                          check=True).stdout
    out, name, body = {}, None, []
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            if name is not None:
                out[name] = body
            name, body = (m.group(1) if "effattn::cpu::" in m.group(1) else None), []
        elif name is not None and "\t" in line:
            ins = line.split("\t", 1)[1].strip()
            ins = re.sub(r"\b[0-9a-f]{3,}\b <.*>$", "TARGET", ins)  # jump / call targets
            ins = re.sub(r"-?0x[0-9a-f]+\(%rip\)", "RIP", ins)  # constant-pool offsets
            out_ins = re.sub(r"#.*", "", ins).strip()
            if out_ins.split()[:1] not in (["nop"], ["nopw"], ["nopl"], ["xchg"]) and "nop" not in out_ins:
                body.append(out_ins)  # (alignment padding dropped)
    if name is not None:
        out[name] = body
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rename", action="append", default=[], help="FROM=TO, a regex on AFTER's names")
    ap.add_argument("--show", help="print the instruction diff of the functions whose name contains this")
    a = ap.parse_args()
    before, after = functions(a.before), functions(a.after)
    renamed = {}
    for name, body in after.items():
        for rule in a.rename:
            src, dst = rule.split("=", 1)
            name = re.sub(src, dst, name)
        renamed[name] = body
    same, differ, missing = [], [], []
    for name, body in before.items():
        if name not in renamed:
            missing.append(name)
        elif renamed[name] == body:
            same.append(name)
        else:
            differ.append(name)
    print(f"{len(before)} functions of effattn::cpu in {a.before}: {len(same)} identical, {len(differ)} differ, "
          f"{len(missing)} not found in {a.after} by name; {len(set(renamed) - set(before))} only in {a.after}")
    print("\nhot functions (tile loops, GEMMs):")
    for name in sorted(n for n in before if HOT.search(n)):
        state = "identical" if name in same else ("DIFFERS" if name in differ else "not found")
        print(f"  {state:9s}  {name[:150]}")
    print("\nother functions that differ (set-up, dispatch):")
    for name in sorted(differ):
        if not HOT.search(name):
            print(f"  {len(before[name]):5d} -> {len(renamed[name]):5d} instructions  {name[:130]}")
    if a.show:
        for name in differ:
            if a.show in name:
                print(f"\n--- {name}")
                print("\n".join(difflib.unified_diff(before[name], renamed[name], lineterm="", n=1)))


if __name__ == "__main__":
    main()
