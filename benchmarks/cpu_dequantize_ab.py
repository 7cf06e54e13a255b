"""The NF4 base on the CPU: dequantized at every call (bitsandbytes' Linear4bit) against kept
dequantized (``quantization.cpu_dequantize``, a plain fp32 linear), for one SmolLM2-135M MLP
projection (576 -> 1536, NF4, double quant) at the three shapes a run uses:

- train: forward + backward over 4 x 256 tokens (one step's rows),
- eval: forward over 4 x 256 tokens,
- decode: forward over 3 rows (one generated token for the 3 sample prompts).

    python benchmarks/cpu_dequantize_ab.py [--rounds 3]

One torch thread, CPU seconds of this process (``time.process_time``), a and b alternating, the
median of the rounds: on a machine busy with other work, the ratio holds better than wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def layers():
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    torch.manual_seed(0)
    dense = torch.nn.Linear(576, 1536, bias=False)
    per_call = bnb.nn.Linear4bit(576, 1536, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                                 compress_statistics=True)
    per_call.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                        compress_statistics=True)._quantize("cpu")
    kept = torch.nn.Linear(576, 1536, bias=False)
    kept.weight = torch.nn.Parameter(dequantize_4bit(per_call.weight.data, per_call.weight.quant_state),
                                     requires_grad=False)
    return per_call, kept


def cpu_seconds(fn, n: int) -> float:
    tick = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - tick) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    per_call, kept = layers()
    x = torch.randn(1024, 576, requires_grad=True)
    x3 = torch.randn(3, 576)
    with torch.no_grad():
        print("max |per call - kept| (no grad):", (per_call(x) - kept(x)).abs().max().item())

    def train(layer):
        layer(x).sum().backward()
        x.grad = None

    @torch.no_grad()
    def forward(layer, rows):
        layer(rows)

    shapes = {"train (fwd+bwd, 1024 tokens)": (lambda l: train(l), 5),
              "eval (fwd, 1024 tokens)": (lambda l: forward(l, x), 5),
              "decode (fwd, 3 rows)": (lambda l: forward(l, x3), 200)}
    print(f"load average {os.getloadavg()}")
    for name, (fn, n) in shapes.items():
        a, b = [], []
        for _ in range(args.rounds):
            a.append(cpu_seconds(lambda: fn(per_call), n))
            b.append(cpu_seconds(lambda: fn(kept), n))
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{name}: per call {ma * 1e3:.2f} ms, kept {mb * 1e3:.2f} ms CPU: kept x{ma / mb:.2f}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
