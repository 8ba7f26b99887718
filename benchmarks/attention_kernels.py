"""Times the cross-attention kernels this package can dispatch to (fwd+bwd, bf16) on one GPU.

The numbers justify the kernel choices in `hf_flash_perceiver/attention_backends.py`: by default the masked-kernel
choice; with `--backends`, cuDNN against FlashAttention-2 for unmasked calls over a sweep of input lengths, batches
and heads (256 queries), next to what the `"sdpa"` backend dispatches to (`flash_beats_cudnn`).
Usage: python benchmarks/attention_kernels.py [--backends] [--out results.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from torch.nn.attention import SDPBackend, sdpa_kernel

from hf_flash_perceiver.attention_backends import (
    KeyPaddingMask, attention, flash_attn_4_available, flash_attn_available, flash_beats_cudnn,
)

# (keys, batch) for the --backends sweep, crossed with (heads, head width); 256 queries (latents) throughout.
SWEEP_POINTS = ((256, 128), (4096, 128), (16384, 48), (32768, 16), (65536, 8), (131072, 8), (131072, 2),
                (524288, 2), (524288, 1))
SWEEP_HEADS = ((1, 64), (8, 64), (1, 128), (2, 32))


def time_ms(fn, iters=20, warmup=5):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def backend_sweep() -> list[dict]:
    """Unmasked forward + backward on cuDNN, on FlashAttention-2, and as the "sdpa" backend dispatches it."""
    records = []
    print(f"{'keys':>7s} {'B':>4s} {'H':>2s} {'D':>4s} {'cuDNN ms':>9s} {'flash ms':>9s} {'sdpa ms':>9s}  dispatch")
    for (n, batch), (heads, dim) in ((p, h) for p in SWEEP_POINTS for h in SWEEP_HEADS):
        q, k, v = (torch.randn(batch, m, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for m in (256, n, n))
        grad = torch.randn(batch, 256, heads, dim, device="cuda", dtype=torch.bfloat16)

        def forced(backend):
            def step():
                with sdpa_kernel([backend]):
                    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
                out.transpose(1, 2).backward(grad)
            return step

        def dispatched():
            attention(q, k, v, None, implementation="sdpa")[0].backward(grad)

        row = {"keys": n, "batch": batch, "heads": heads, "head_dim": dim, "latents": 256,
               "cudnn_ms": time_ms(forced(SDPBackend.CUDNN_ATTENTION)),
               "flash_ms": time_ms(forced(SDPBackend.FLASH_ATTENTION)), "sdpa_ms": time_ms(dispatched),
               "dispatch": "flash" if flash_beats_cudnn(batch, heads, 256, n) else "sdpa's choice"}
        records.append(row)
        print(f"{n:7d} {batch:4d} {heads:2d} {dim:4d} {row['cudnn_ms']:9.3f} {row['flash_ms']:9.3f} "
              f"{row['sdpa_ms']:9.3f}  {row['dispatch']}", flush=True)
        del q, k, v, grad
    return records


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--backends", action="store_true", help="the unmasked cuDNN / FlashAttention-2 sweep")
    args = parser.parse_args()
    if args.backends:
        records = backend_sweep()
        if args.out:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "records": records},
                      open(args.out, "w"), indent=1)
        return
    B, M, N, H, D = 32, 256, 16384, 1, 64
    dt = torch.bfloat16
    q = torch.randn(B, M, H, D, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(B, N, H, D, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn(B, N, H, D, device="cuda", dtype=dt, requires_grad=True)
    lengths = torch.randint(N // 4, N + 1, (B,), device="cuda")
    mask = torch.arange(N, device="cuda")[None] < lengths[:, None]
    records = []
    cases = [("unmasked sdpa", "sdpa", None), ("masked sdpa (cuDNN forced)", "sdpa", mask),
             ("masked varlen", "varlen", mask)]
    for available, impl, label in [(flash_attn_available, "flash_attention_2", "flash-attn 2"),
                                   (flash_attn_4_available, "flash_attention_4", "flash-attn 4")]:
        if available():
            cases += [(f"unmasked {label}", impl, None), (f"masked {label} (varlen)", impl, mask)]
    for name, impl, m in cases:
        def step():
            kpm = KeyPaddingMask.from_mask(m) if m is not None else None
            out, _ = attention(q, k, v, kpm, implementation=impl)
            out.float().sum().backward()
        ms = time_ms(step)
        records.append({"kernel": name, "ms": ms, "B": B, "latents": M, "keys": N, "head_dim": D})
        print(f"{name:32s} {ms:8.3f} ms")
    # the memory-efficient fallback SDPA picks by itself for a masked call, for reference
    am = mask[:, None, None, :]
    def eff():
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=am)
        out.float().sum().backward()
    ms = time_ms(eff)
    records.append({"kernel": "masked sdpa (memory-efficient)", "ms": ms, "B": B, "latents": M, "keys": N, "head_dim": D})
    print(f"{'masked sdpa (memory-efficient)':32s} {ms:8.3f} ms")
    if args.out:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "records": records},
                  open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
