"""Times the masked cross-attention kernels this package can dispatch to (fwd+bwd, bf16) on one GPU.

The numbers justify the masked-kernel choice in `hf_flash_perceiver/attention_backends.py`.
Usage: python benchmarks/attention_kernels.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from hf_flash_perceiver.attention_backends import KeyPaddingMask, attention, flash_attn_4_available, flash_attn_available


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
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
    from torch.nn.attention import SDPBackend, sdpa_kernel
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
