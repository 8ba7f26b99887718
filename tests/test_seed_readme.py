"""Every code block of the flash-perceiver 0.2.0 README, run verbatim after the one-line import change.

`SEED_README` holds the blocks exactly as published (README of flash-perceiver 0.2.0 on PyPI). `migrate` applies the
import change a user makes; `on_cpu` additionally removes `.cuda()`, `device='cuda'` and `with torch.autocast('cuda'):`
(dedenting its body) mechanically, nothing else: sizes stay the README's (batch 32, 128 tokens, 512 latents of width
512, depth 8). The CUDA variants run the migrated blocks untouched (`pytest -m cuda` on a GPU machine).

The README's blocks build on each other: "Masking", "Extract Embeddings" and "Extract Attention Weights" use the
`model` and `data` of the first ("Perceiver") block, and "Multiple inputs" defines its own `model` (so it runs in a copy
of the first block's namespace). The README has prose but no code for "Custom Latents"; that test follows the prose.

The CPU runs are wrapped in `torch.no_grad()`: the README only runs forward passes, and recording the autograd graph
of a README-sized model would cost ~60% more time on a 2-core CPU without changing any result.
"""

from __future__ import annotations

import textwrap

import pytest
import torch


SEED_README = {
    "perceiver": '''import torch

from flash_perceiver import Perceiver, utils

batch_size, seq_len, in_dim = 32, 128, 256

latent_dim = 512
num_latents = 512
out_dim = 128

model = Perceiver(
    input_dim=in_dim,
    depth=8,
    output_dim=out_dim,
    num_latents=num_latents,
    latent_dim=latent_dim,
    cross_heads=1,
    cross_head_dim=64,
    cross_rotary_emb_dim=0,
    cross_attn_dropout=0.0,
    latent_heads=8,
    latent_head_dim=64,
    latent_rotary_emb_dim=0,
    latent_attn_dropout=0.0,
    weight_tie_layers=False,
    gated_mlp=True,
    self_per_cross_attn=1,
    num_zero_tokens=None,
    use_flash_attn=True,
).cuda()

data = torch.randn(batch_size, seq_len, in_dim, device='cuda')

# `out_dim` specified; averages and projects output
# Note: FlashAttention only supports half-precision.
#  We need to use `torch.autocast` for the forward-pass
with torch.autocast('cuda'):
    out = model(data)

assert out.shape == (32, out_dim)
''',
    "multiple_inputs": '''input_dims = [256, 512]

model = Perceiver(
    input_dim=input_dims,
    depth=2,  # must equal len(input_dim)
).cuda()

inputs = [
    torch.randn(batch_size, seq_len, in_dim, device='cuda')
    for in_dim in input_dims
]

with torch.autocast('cuda'):
    out = model(inputs)

assert out.shape == (batch_size, num_latents, latent_dim)
''',
    "masking": '''mask = utils.random_mask(data)  # [batch_size, seq_len]

with torch.autocast('cuda'):
    out = model(data, mask=mask)
''',
    "embeddings": '''with torch.autocast('cuda'):
    embeds = model(data, return_embeddings=True)

assert embeds.shape == (32, num_latents, latent_dim)
''',
    "attention_weights": '''with torch.autocast('cuda'):
    out, all_attn_weights = model(data, return_attn_weights=True)

for i, attn_weights in enumerate(all_attn_weights):
    if i % model.num_attention_layers_per_block == 0:
        print('cross-attention map with shape', attn_weights.shape)
    else:
        print('self-attention map with shape', attn_weights.shape)

''',
    "perceiver_io": '''import torch

from flash_perceiver import PerceiverIO, utils

batch_size, seq_len, in_dim = 32, 128, 256

depth = 8
latent_dim = 512
num_latents = 512
query_dim = 128
num_queries = 32
proj_dim = 64

model = PerceiverIO(
    input_dim=in_dim,
    query_dim=query_dim,
    depth=depth,
    proj_dim=proj_dim,
    num_latents=num_latents,
    latent_dim=latent_dim,
    cross_heads=1,
    cross_head_dim=64,
    cross_rotary_emb_dim=0,
    cross_attn_dropout=0.0,
    latent_heads=8,
    latent_head_dim=64,
    latent_rotary_emb_dim=0,
    latent_attn_dropout=0.0,
    query_heads=1,
    query_head_dim=64,
    query_rotary_emb_dim=0,
    query_attn_dropout=0.0,
    weight_tie_layers=False,
    gated_mlp=True,
    use_flash_attn=True,
).cuda()

data = torch.randn(batch_size, seq_len, in_dim, device='cuda')

# Can be learned or correspond to positions, tokens, etc.
queries = torch.randn(num_queries, query_dim, device='cuda')

with torch.autocast('cuda'):
    out = model(data, queries=queries)

assert out.shape == (batch_size, num_queries, proj_dim)
''',
}
AUTOCAST = "with torch.autocast('cuda'):"


def migrate(src: str) -> str:
    """The user's one change: the import."""
    assert "from flash_perceiver import" in src or "flash_perceiver" not in src
    return src.replace("from flash_perceiver import", "from hf_flash_perceiver import")


def on_cpu(src: str) -> str:
    """Remove `.cuda()`, `device='cuda'` and the autocast context (dedenting its body); nothing else changes."""
    src = src.replace(".cuda()", "").replace(", device='cuda'", "")
    out, in_autocast = [], False
    for line in src.splitlines(keepends=True):
        if line.strip() == AUTOCAST:
            in_autocast = True
            continue
        if in_autocast and line.strip() and not line.startswith("    "):
            in_autocast = False
        out.append(line[4:] if in_autocast and line.startswith("    ") else line)
    cpu = "".join(out)
    assert "cuda" not in cpu, cpu
    return cpu


def run(name: str, namespace: dict, device: str) -> dict:
    src = migrate(SEED_README[name])
    if device == "cpu":
        with torch.no_grad():
            exec(compile(on_cpu(src), f"<seed README: {name}>", "exec"), namespace)
    else:
        exec(compile(src, f"<seed README: {name}>", "exec"), namespace)
    return namespace


def test_on_cpu_is_mechanical():
    src = SEED_README["attention_weights"]
    cpu = on_cpu(src)
    assert cpu == textwrap.dedent('''\
        out, all_attn_weights = model(data, return_attn_weights=True)

        for i, attn_weights in enumerate(all_attn_weights):
            if i % model.num_attention_layers_per_block == 0:
                print('cross-attention map with shape', attn_weights.shape)
            else:
                print('self-attention map with shape', attn_weights.shape)

        ''')
    assert migrate(SEED_README["perceiver"]).count("from hf_flash_perceiver import Perceiver, utils") == 1


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(scope="module", params=DEVICES)
def perceiver_namespace(request):
    """The README's first block, run once per device; the blocks that build on it reuse its namespace."""
    torch.manual_seed(0)
    ns = run("perceiver", {}, request.param)
    ns["_device"] = request.param
    return ns


def test_readme_perceiver(perceiver_namespace):
    ns = perceiver_namespace
    assert ns["out"].shape == (32, 128) and torch.isfinite(ns["out"]).all()
    assert ns["out"].device.type == ns["_device"]


def test_readme_multiple_inputs(perceiver_namespace):
    ns = run("multiple_inputs", dict(perceiver_namespace), perceiver_namespace["_device"])
    assert ns["model"].input_dims == [256, 512] and torch.isfinite(ns["out"]).all()


def test_readme_masking(perceiver_namespace):
    ns = run("masking", dict(perceiver_namespace), perceiver_namespace["_device"])
    assert ns["mask"].shape == (32, 128) and ns["mask"].dtype == torch.bool
    assert ns["out"].shape == (32, 128) and torch.isfinite(ns["out"]).all()


def test_readme_embeddings(perceiver_namespace):
    ns = run("embeddings", dict(perceiver_namespace), perceiver_namespace["_device"])
    # The projection applied to the embeddings gives the block-1 output (the README's "averages and projects").
    head = ns["model"].to_hf().head
    with torch.no_grad(), torch.autocast(ns["_device"], enabled=ns["_device"] == "cuda"):
        projected = head(ns["embeds"])
    tol = 1e-5 if ns["_device"] == "cpu" else 2e-2  # same fp32 ops on CPU; fp16 autocast on CUDA
    torch.testing.assert_close(projected.float(), ns["out"].float(), atol=tol, rtol=tol)


def test_readme_attention_weights(perceiver_namespace, capsys):
    ns = run("attention_weights", dict(perceiver_namespace), perceiver_namespace["_device"])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["cross-attention map with shape torch.Size([32, 1, 512, 128])",
                     "self-attention map with shape torch.Size([32, 8, 512, 512])"] * 8
    assert ns["out"].shape == (32, 128)


def test_readme_custom_latents(perceiver_namespace):
    """The README's prose: latents of shape [m, latent_dim] (any m) or [batch_size, n, latent_dim];
    `num_latents=None` builds no latents."""
    ns = perceiver_namespace
    model, data, device = ns["model"], ns["data"], ns["_device"]
    with torch.no_grad(), torch.autocast(device, enabled=device == "cuda"):
        assert model(data, latents=torch.randn(16, 512, device=device), return_embeddings=True).shape == (32, 16, 512)
        assert model(data, latents=torch.randn(32, 8, 512, device=device)).shape == (32, 128)
    no_latents = ns["Perceiver"](input_dim=256, depth=1, num_latents=None).to(device)
    assert no_latents.latents is None
    with pytest.raises(ValueError, match="pass `latents`"):
        no_latents(data)


@pytest.mark.parametrize("device", DEVICES)
def test_readme_perceiver_io(device):
    torch.manual_seed(0)
    ns = run("perceiver_io", {}, device)
    assert ns["out"].shape == (32, 32, 64) and torch.isfinite(ns["out"]).all()
