"""The `bmkernels` command (also `python -m bmkernels`).

    bmkernels bench [--quick | --full] [--op OP] [--models] [--filter TEXT] [--reps N] [--json PATH]
                    [--no-ceilings] [--plot DIR [--from-json FILE]] [--list]
    bmkernels info [--json]
    bmkernels train MODEL [options]      (MODEL: transformer, cnn, autoencoder, gru; see --help)

Exit status: 0 on success, 1 when the run fails (e.g. the compiled extension is missing, no case
matches --filter, the JSON file cannot be written), 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class _Failure(Exception):
    """An error to report as `bmkernels <cmd>: error: ...` with exit status 1."""


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return value


def build_parser():
    from bmkernels import bench

    parser = argparse.ArgumentParser(
        prog="bmkernels", description="bmkernels: fused attention, conv2d and GRU kernels for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "bench",
        help="benchmark bmkernels against PyTorch baselines (interleaved, same process)",
        description="Time bmkernels and its baselines interleaved in one process and print a table of "
        "medians, GFLOP/s, ratios (baseline time / bmkernels time; > 1 means bmkernels is "
        "faster) and saved activation memory. Presets: default (a few minutes on 2 cores), "
        "--full (every case), --quick (tiny shapes, a smoke run of seconds).",
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument(
        "--full",
        action="store_const",
        dest="preset",
        const="full",
        help="every case: all shapes x fp32/bf16 x causal/full x fwd/fwd+bwd (long)",
    )
    preset.add_argument(
        "--quick", action="store_const", dest="preset", const="quick", help="tiny shapes, a smoke run of a few seconds"
    )
    preset.add_argument("--preset", dest="preset", choices=bench.PRESETS, help=argparse.SUPPRESS)
    p.set_defaults(preset="default")
    p.add_argument(
        "--op",
        action="append",
        choices=sorted(bench.OPS),
        metavar="OP",
        help=f"op family to benchmark, repeatable (default: {', '.join(sorted(bench.DEFAULT_OPS))})",
    )
    p.add_argument(
        "--models",
        action="append_const",
        dest="op",
        const="cnn_models",
        help="whole CNNs (torchvision ResNet-18/50, MobileNetV2; timm resnet18, efficientnet_b0, convnext_atto): "
        "swapped vs eager vs torch.compile, eval and an SGD step, NCHW and channels_last (= --op cnn_models)",
    )
    p.add_argument("--filter", metavar="TEXT", help="only cases whose name contains TEXT, e.g. 'fwd+bwd' or '2048'")
    p.add_argument(
        "--reps",
        type=_positive_int,
        metavar="N",
        help="measured repetitions per contender (default: at least 5, more for fast cases, "
        "within a time budget per case; fewer than 5 is below the benchmark protocol)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results, with every sample, as JSON to PATH")
    p.add_argument("--no-memory", action="store_true", help="skip the saved-activation-memory probe")
    p.add_argument(
        "--no-ceilings",
        action="store_true",
        help="skip measuring the machine's ceilings (fp32/bf16 GEMM, conv, DRAM read rate; seconds) and the "
        "'%% ceiling' column",
    )
    p.add_argument(
        "--plot",
        metavar="DIR",
        help="also write PNG plots to DIR (attention time and memory vs length, conv layers, GRU vs hidden size, "
        "whole models; needs matplotlib)",
    )
    p.add_argument(
        "--from-json",
        metavar="FILE",
        help="run nothing: print the tables of a saved --json FILE (and plot it with --plot DIR)",
    )
    p.add_argument("--list", action="store_true", help="list the cases of the preset and exit")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "info",
        help="what this installation was built with (CPU ISAs, CUDA archs, Triton)",
        description="Print bmkernels.build_info(): compiled CPU instruction sets and the active one, "
        "CUDA archs and kernels, Triton, torch and CUDA versions.",
    )
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_info)

    from bmkernels import train

    p = sub.add_parser(
        "train",
        help="train a reference model on embedded data (Python standard library text)",
        description="Train a bmkernels reference model on data that ships with Python: a progress bar, "
        "evaluation and an atomic checkpoint every --eval-every steps, a loss-curve PNG, --resume, "
        "--kernels torch for A/B runs. Runs under `torchrun --nproc_per_node=N` with "
        "DistributedDataParallel.",
    )
    train.add_parsers(p)
    p.set_defaults(func=cmd_train)
    return parser


def _fmt_value(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) if v else "none"
    return "none" if v is None else str(v)


def cmd_info(args):
    import torch

    import bmkernels

    info = bmkernels.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    labels = {
        "version": "bmkernels version",
        "extension_loaded": "compiled extension loaded",
        "cpu_isas": "CPU ISAs compiled",
        "active_cpu_isa": "active CPU ISA",
        "cuda_archs": "CUDA archs compiled",
        "cuda_kernels": "CUDA kernels",
        "cuda_verified": "CUDA kernels GPU-verified (auto)",
        "cuda_emulated_kernels": "CUDA kernels emulated",
        "triton_available": "Triton installed",
        "triton_kernels": "Triton kernels",
        "torch": "torch",
        "torch_cuda": "torch CUDA version",
        "cuda_device_available": "CUDA device available",
    }
    rows = [(labels.get(k, k), _fmt_value(v)) for k, v in info.items()]
    rows.append(("torch CPU threads", str(torch.get_num_threads())))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if not info.get("extension_loaded"):
        print(
            "\nThe compiled extension is not loaded: only backend='reference' works. Build it with "
            "`pip install --no-build-isolation -e .`."
        )
    return 0


def _plot(data, directory):
    from bmkernels.bench import plot

    try:
        paths = plot.plot(data, directory)
    except OSError as e:
        raise _Failure(f"cannot write --plot {directory!r}: {e}") from None
    print(f"Plots written: {', '.join(paths) if paths else 'none (no plottable case)'}.")


def _from_json(args):
    from bmkernels import bench

    try:
        with open(args.from_json) as f:
            data = json.load(f)
        tables = bench.format_table(data["results"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise _Failure(f"cannot read --from-json {args.from_json!r} as `bmkernels bench --json` output: {e}") from None
    print(tables)
    if args.plot:
        _plot(data, args.plot)
    return 0


def cmd_bench(args):
    from bmkernels import _backend, _extension, bench

    if args.from_json:
        return _from_json(args)
    cases = bench.cases_for(args.op, args.preset, args.filter)
    if not cases:
        raise _Failure(f"no {args.preset} case matches --filter {args.filter!r}; see `bmkernels bench --list`")
    if args.list:
        for c in cases:
            skipped = "".join(f"  [{n}: {why}]" for n, why in c.skipped.items())
            print(f"{c.op:<10} {c.name}  ({', '.join(c.contenders)}){skipped}")
        return 0
    _extension.require("bmkernels bench")
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise _Failure(f"cannot create the directory for --json {args.json!r}: {e}") from None

    env = bench.environment()
    backend = _backend.requested(None)
    print(f"# bmkernels bench: preset {args.preset}, {len(cases)} cases", flush=True)
    print(
        f"# torch {env['torch']}, {env['threads']} threads, torch CPU capability {env['cpu_capability']}, "
        f"bmkernels CPU ISA {env['bmkernels_cpu_isa']}, bmkernels backend {backend}, "
        f"CPU {env['processor']} ({os.cpu_count()} CPUs), load average {env['load_average']}",
        flush=True,
    )
    if args.reps is not None and args.reps < 5:
        print(f"# note: --reps {args.reps} is below the protocol's 5 repetitions", flush=True)
    ceilings = None
    if not args.no_ceilings:  # each case reports its share of the relevant one
        ceilings = bench.measure_ceilings(quick=args.preset == "quick")
        print(
            f"# ceilings (torch.mm, ATen 3x3 conv, sum over a large buffer): {bench.ceilings_line(ceilings)}",
            flush=True,
        )
    start = time.perf_counter()
    knobs = dict(bench.TIMING[args.preset])
    results = []
    for i, case in enumerate(cases):
        res = bench.run_case(case, reps=args.reps, memory=not args.no_memory, **knobs)
        results.append(res)
        bench.print_progress(i, len(cases), case, res)
    total = time.perf_counter() - start
    print()
    data = bench.to_json(results, args.preset, total, env, ceilings)
    print(bench.format_table(data["results"]))
    print(f"\nTotal: {total:.1f} s for {len(cases)} cases; load average at the end {bench.load_average()}.")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1)
        except OSError as e:
            raise _Failure(f"cannot write --json {args.json!r}: {e}") from None
        print(f"Results written to {args.json}.")
    if args.plot:
        _plot(data, args.plot)
    return 0


def cmd_train(args):
    from bmkernels import train

    try:
        train.run(args)
    except OSError as e:
        raise _Failure(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)) from None
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except (_Failure, RuntimeError, ValueError) as e:
        print(f"bmkernels {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bmkernels {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
