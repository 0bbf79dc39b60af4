"""Where a compiled tvm-rmsmp model spends its time: milliseconds per kind of call.

Run from the repository root::

    python -m bench.profile_model                     # ResNet-18, batch 1, one thread
    python -m bench.profile_model --model bert_layer --threads 2
    python -m bench.profile_model --model ffn --batch 128

Builds the model as ``bench.cpu`` does (random weights, RMSMP 60:35:5, 8-bit activations,
untuned ``rmsmp.compile`` for this CPU), then times every call the Relax VM makes through its
instrument hook over ``--repeat`` runs. Calls are grouped by name with the layer numbers
removed (``rmsmp_conv2d_layer#_#_conv#_sp#_#_packed`` is every SP2 group of a residual
block's convolutions), so the table says which kind of kernel or glue to work on next. The
hook adds a few microseconds per call; compare the rows, not the total, with ``bench.cpu``.
The profiler itself is ``tvm_rmsmp.cli.profile`` (``tvm-rmsmp profile`` for any exported library).
"""

from __future__ import annotations

import argparse
import os

from tvm_rmsmp.cli.profile import format_table, profile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "bert_layer", "ffn"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="leading dimension of the input (FFN: tokens)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error(f"--batch must be at least 1, got {args.batch}")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    import tvm_rmsmp as rmsmp
    from bench import cpu

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    build, shape = {"resnet18": (cpu.resnet18, (1, 3, 224, 224)), "bert_layer": (cpu.bert_layer, (1, 128, 768)),
                    "ffn": (cpu.ffn_model, (1, 1, 768))}[args.model]
    shape = (shape[0] * args.batch, *shape[1:]) if args.model != "ffn" else (1, args.batch, 768)
    model = build().eval()
    x = torch.randn(*shape)
    q = cpu.rmsmp_quantized(model, [torch.randn(*shape) for _ in range(2)])
    exe = rmsmp.compile(q, (x,))
    rows = profile(exe, (x,), args.repeat)
    print(f"{args.model}, {args.threads} thread(s), mean of {args.repeat} runs; kernels: {exe.stats.get('cpu_kernels')}")
    print(format_table(rows, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
