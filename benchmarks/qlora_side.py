"""qlora-ray as a side of the throughput benchmark (its own process): the project's spec, data
packing, model loading and training step, with or without the fused path.

    python benchmarks/qlora_side.py --work WORK (--out result.json | --serve) [--fused] [--batch-size 8]
        [--checkpointing true] [--offload] [--compile] [--profile profile.md]

Everything not named here is the spec's default (packed rows of 512, LoRA r16 / alpha 32 /
dropout 0.05 on all linear layers, paged 8-bit AdamW, cosine schedule with 3% warm-up,
gradient checkpointing on), except the compute dtype: fp16 on every side, as on a T4.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sides  # noqa: E402

# Linear parameters of the TinyLlama shape a token passes through (22 layers + the output head).
LINEAR_PARAMS = 22 * (2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632) + 2048 * 32000
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "T4": 65.0}  # dense fp16/bf16 datasheet


def write_spec(work: Path, task: sides.Task, args) -> Path:
    spec = work / f"spec_{args.name}.yaml"
    spec.write_text(f"""\
name: bench
model: {{name: {work / "model"}}}
data: {{train: {work / "train.jsonl"}, eval: {work / "eval.jsonl"}, format: text, max_seq_len: {task.max_seq_len},
        cache_dir: {work}/cache_{args.name}}}
quantization: {{mode: nf4, double_quant: true, compute_dtype: {"fp32" if args.cpu else "fp16"}}}
lora: {{r: {task.lora_r}, alpha: {2 * task.lora_r}}}
train: {{lr: {task.lr}, batch_size: {args.batch_size}, gradient_checkpointing: {args.checkpointing},
         optimizer: {"adamw" if args.cpu else "auto"}, seed: {task.seed}}}
resources: {{gpus_per_trial: {0 if args.cpu else 1}}}
output: {{dir: {work}/runs}}
""")
    return spec


def train(args, task: sides.Task, max_steps: int = 0):
    from qlora_ray import data
    from qlora_ray.model import add_lora, load_base
    from qlora_ray.spec import load_spec
    from qlora_ray.train.optim import build_parts
    from qlora_ray.train.step import step

    spec = load_spec(write_spec(args.work, task, args))
    model, tokenizer, dtype, _ = load_base(spec)
    prepared = data.prepare(spec.data, tokenizer)
    torch.manual_seed(task.seed)
    model = add_lora(model, spec)
    handle = None
    if args.fused:
        from qlora_ray.kernels import fuse

        handle = fuse(model, compile=args.compile, offload=args.offload)
    t = spec.train
    batches = data.train_batches(prepared, spec.data, t.batch_size, 0, t.seed)
    parts = build_parts(model, t, len(batches), dtype)
    clock, losses = sides.Clock(), []
    for i in range(min(len(batches), max_steps) if max_steps > 0 else len(batches)):
        batch = batches[i]  # collated before the clock starts, as the Trainer's batches are
        if args.profile and i == len(batches) // 2 and not max_steps:
            try:
                profile_step(args, parts, batch, t, tokenizer.pad_token_id)
            except Exception as e:  # a profile that fails must not cost the run
                print(f"profile failed: {type(e).__name__}: {e}", flush=True)
            continue
        clock.start()
        outcome = step(parts, [batch], t, i + 1, tokenizer.pad_token_id)
        clock.stop(outcome.targets)
        losses.append(outcome.loss_sum / max(1, outcome.targets))
    return model, tokenizer, handle, clock, losses


def profile_step(args, parts, batch, t, pad_id) -> None:
    """One step under the torch profiler: CUDA time by kernel family, matmul share, MFU."""
    from torch.profiler import ProfilerActivity, profile

    from qlora_ray.train.step import step

    sides.sync()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        targets = step(parts, [batch], t, 0, pad_id).targets
        sides.sync()
    wall = time.perf_counter() - started
    families = {}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.self_device_time_total
        families[kernel_family(event.key)] = families.get(kernel_family(event.key), 0.0) + us
    total = sum(families.values()) or float("nan")  # nan on the CPU: no CUDA kernels
    gpu = sides.gpu_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), float("nan"))
    model_tflops = 4 * LINEAR_PARAMS * targets / 1e12  # forward + input-gradient backward, frozen base
    lines = [f"One {'fused' if args.fused else 'peft'} step, batch_size {args.batch_size} rows of 512, "
             f"{targets} target tokens, {gpu}, under the profiler: wall {wall * 1e3:.0f} ms, "
             f"CUDA kernel time {total / 1e3:.0f} ms.", "",
             "| kernel family | CUDA ms | share |", "| --- | --- | --- |"]
    lines += [f"| {name} | {us / 1e3:.1f} | {us / total:.1%} |"
              for name, us in sorted(families.items(), key=lambda kv: -kv[1])]
    lines += ["", f"Model FLOPs (4 x {LINEAR_PARAMS / 1e9:.3f} G linear parameters x target tokens: forward and "
              f"input-gradient backward of the frozen base; recomputation not counted): {model_tflops:.1f} TFLOP; "
              f"MFU at the profiled wall time {model_tflops / wall / peak:.1%}, at the kernel time "
              f"{model_tflops / (total / 1e6) / peak:.1%} of {peak:.0f} TFLOP/s."]
    Path(args.profile).write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


FAMILIES = [("matmul", r"gemm|matmul|cutlass|xmma|nvjet|cublas|sm\d+_.*tensorop|wgmma"),
            ("attention", r"fmha|flash|attention|efficient"),
            ("dequantize (NF4)", r"dequant|kDequantize"),
            ("optimizer", r"optimizer|adam|kOptimizer|kPreconditionOptimizer"),
            ("dtype copies", r"copy|to_copy|convert"),
            ("cross-entropy / softmax", r"softmax|log_softmax|nll|cross_entropy"),
            ("reductions", r"reduce|norm|sum"),
            ("elementwise", r"elementwise|vectorized|triton|fused|unrolled|silu|mul|add")]


def kernel_family(name: str) -> str:
    for family, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return family
    return "other"


def main() -> None:
    parser = sides.side_parser(__doc__)
    parser.add_argument("--name", default=None)
    parser.add_argument("--fused", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8, help="Packed rows of 512 a step (the spec default 8).")
    parser.add_argument("--checkpointing", default="true")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile SwiGLU's backward and RMSNorm.")
    parser.add_argument("--profile", default=None, help="Profile the middle step into this markdown file.")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    args.name = args.name or ("fused" if args.fused else "qlora")
    task = sides.Task.read(args.work)
    sides.cap_memory(task.cap_gib)
    profile, runs = args.profile, [0]

    def run_once(command: dict) -> sides.SideResult:
        started = time.time()
        # Profile one step of the first timed run only (the profiler's own cost stays out of the others).
        args.profile = profile if not command.get("warm") and runs[0] == 0 else None
        runs[0] += 0 if command.get("warm") else 1
        model, tokenizer, handle, clock, losses = train(args, task, command.get("max_steps") or 0)
        rate, timed = sides.timed_rate(clock.tokens, clock.times, task.warm_share)
        peak = sides.peak_gib()
        held = None if command.get("warm") else sides.heldout_loss(
            model, sides.rows(args.work, "eval"), tokenizer.pad_token_id, torch.float32 if args.cpu else torch.float16)
        notes = {"batch_size_rows": args.batch_size, "checkpointing": args.checkpointing, "fused": args.fused}
        if handle is not None:
            notes.update(compiled=handle.compiled, offloaded_layers=handle.offloaded,
                         fused_modules=handle.attention + handle.mlp)
            handle.unfuse()
        return sides.SideResult(
            side=args.name, tokens_per_s=rate, peak_gib=peak, eval_loss=held,
            final_loss=sum(losses[-5:]) / max(1, len(losses[-5:])), steps=len(clock.times), timed_steps=timed,
            target_tokens=sum(clock.tokens), batch=args.batch_size * task.max_seq_len, train_s=sum(clock.times),
            process_s=time.time() - started, gpu=sides.gpu_name(), notes=notes)

    sides.serve_or_run(run_once, args)


if __name__ == "__main__":
    main()
