"""Reads a build log made with nvcc -Xptxas=-v and fails if any CUDA kernel spills registers.
Prints one line per kernel (registers, spill stores/loads); no CUDA kernels is reported, not failed."""

import re
import sys

FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")


def main(path):
    kernel, arch, spills, rows = None, None, [], 0
    for line in open(path, errors="replace"):
        if m := FUNC.search(line):
            kernel, arch = m.groups()
        elif (m := SPILL.search(line)) and kernel:
            stores, loads = map(int, m.groups())
            if stores or loads:
                spills.append(f"{kernel} [{arch}]: {stores} B spill stores, {loads} B spill loads")
        elif (m := REGS.search(line)) and kernel:
            rows += 1
            print(f"ptxas: {arch} {kernel}: {m.group(1)} registers")
    if rows == 0:
        print("ptxas: no CUDA kernels in this build")
    if spills:
        print("ptxas: register spills found:\n  " + "\n  ".join(spills))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
