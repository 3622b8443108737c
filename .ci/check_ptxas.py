"""Static checks of the CUDA kernels, no GPU needed. Usage: check_ptxas.py BUILD_LOG [EXTENSION.so]

1. From a build log made with nvcc -Xptxas=-v: per kernel and arch, registers, stack frame and spills;
   fails on any spill, any stack frame, or registers over the kernel family's budget.
2. Given the built extension and cuobjdump (from triton's wheel, or on PATH): `cuobjdump -res-usage`
   (registers, shared, local memory per kernel: local memory fails) and the SASS of the attention
   forward and conv_igemm kernels (f16/bf16 must use HMMA, LDSM and LDGSTS; no kernel may use LDL/STL).
Prints a table; no CUDA kernels in the build is reported, not failed."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")
# register budget per kernel family (mangled names contain the family): at most 255 with 128 threads
# conv_/gru_: element-wise, 256 threads; listed before them (the first family found wins): conv_igemm (tensor
# cores, 128 threads) and gru_persistent (one CTA per SM)
BUDGET = {"attention": 255, "arch_": 64, "conv_igemm": 255, "conv_": 64, "gru_persistent": 255, "gru_": 64}
TENSOR_CORE_SASS = ("HMMA", "LDSM", "LDGSTS")


def family(kernel):
    return next((f for f in BUDGET if f in kernel), None)


def demangle(names):
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out, strict=False))


def parse_log(path):
    rows, kernel, arch = {}, None, None
    for line in open(path, errors="replace"):
        if m := FUNC.search(line):
            kernel, arch = m.groups()
            rows[(kernel, arch)] = {"regs": None, "stack": 0, "spill": 0}
        elif (m := FRAME.search(line)) and kernel:
            stack, stores, loads = map(int, m.groups())
            rows[(kernel, arch)].update(stack=stack, spill=stores + loads)
        elif (m := REGS.search(line)) and kernel:
            rows[(kernel, arch)]["regs"] = int(m.group(1))
    return rows


def cuobjdump():
    try:
        import triton

        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if tool.exists():
            return str(tool)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def check_binary(so, failures):
    tool = cuobjdump()
    if tool is None:
        print("check: cuobjdump not found (triton's wheel ships one): binary checks skipped")
        return
    res = subprocess.run([tool, "-res-usage", so], capture_output=True, text=True)
    if res.returncode != 0:
        print(f"check: cuobjdump -res-usage found no CUDA code in {so}")
        return
    func = None
    for line in res.stdout.splitlines():
        if m := re.search(r"Function (\S+):", line):
            func = m.group(1)
        elif func and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)):
            regs, stack, shared, local = map(int, m.groups())
            name = demangle([func])[func]
            print(f"cuobjdump: {name}: {regs} registers, stack {stack}, static shared {shared}, local {local}")
            if local or stack:
                failures.append(f"{func}: {local} B local memory, {stack} B stack (cuobjdump)")
    sass = subprocess.run([tool, "-sass", so], capture_output=True, text=True).stdout
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        ops = set(re.findall(r"\b([A-Z][A-Z0-9]+)(?:\.[A-Z0-9.]+)?\s", block))
        if {"LDL", "STL"} & ops:
            failures.append(f"{name}: local loads/stores in SASS")
        # the attention backward is SIMT (v1); conv_igemm is f16/bf16 only
        if "conv_igemm" in name or ("attention_fwd" in name and ("f16" in name or "bf16" in name)):
            missing = [op for op in TENSOR_CORE_SASS if op not in ops]
            if missing:
                failures.append(f"{name}: SASS lacks {', '.join(missing)}")
            else:
                print(f"sass: {demangle([name])[name]}: {', '.join(TENSOR_CORE_SASS)} present")


def main(log, so=None):
    rows = parse_log(log)
    failures = []
    names = demangle(sorted({k for k, _ in rows}))
    for (kernel, arch), r in sorted(rows.items()):
        print(f"ptxas: {arch} {names[kernel]}: {r['regs']} registers, {r['stack']} B stack, {r['spill']} B spills")
        fam = family(kernel)
        if r["spill"] or r["stack"]:
            failures.append(f"{names[kernel]} [{arch}]: {r['spill']} B spills, {r['stack']} B stack frame")
        if fam and r["regs"] is not None and r["regs"] > BUDGET[fam]:
            failures.append(f"{names[kernel]} [{arch}]: {r['regs']} registers > budget {BUDGET[fam]}")
    if not rows:
        print("ptxas: no CUDA kernels in this build")
    if so and rows:
        check_binary(so, failures)
    if failures:
        print("check: failed:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
