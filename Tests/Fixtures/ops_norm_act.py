"""Golden cases for group norm, layer norm and the activations (Sources/Tensor/Ops/Norm.swift, Activation.swift)."""
import torch
import torch.nn.functional as F


def cases(save):
    g = torch.Generator().manual_seed(4242)

    def randn(*shape, std=1.0, offset=0.0):
        return torch.randn(*shape, generator=g) * std + offset

    # --- group norm (32 groups, as in SDXL's UNet/VAE) ---
    def gn_affine(x, weight, bias):
        return F.group_norm(x, 32, weight, bias, 1e-5)
    save("groupnorm_c64_affine", gn_affine,
         {"x": randn(2, 64, 5, 7, std=2.0, offset=0.5), "weight": randn(64, std=0.5, offset=1.0), "bias": randn(64)},
         args={"groups": 32, "eps": 1e-5})

    def gn_plain(x):
        return F.group_norm(x, 32, None, None, 1e-6)
    save("groupnorm_c96_plain", gn_plain, {"x": randn(2, 96, 5, 7)}, args={"groups": 32, "eps": 1e-6})

    # mean ≫ std: a one-pass E[x²] − E[x]² in fp32 would lose the variance here
    def gn_offset(x, weight, bias):
        return F.group_norm(x, 32, weight, bias, 1e-6)
    save("groupnorm_offset", gn_offset,
         {"x": randn(2, 64, 3, 3, offset=50.0), "weight": randn(64, std=0.5, offset=1.0), "bias": randn(64)},
         args={"groups": 32, "eps": 1e-6})

    # [N, C] with no spatial dims: 2 channels per group, 2 elements per group
    def gn_nospatial(x, weight, bias):
        return F.group_norm(x, 32, weight, bias, 1e-5)
    save("groupnorm_nospatial", gn_nospatial,
         {"x": randn(4, 64, std=3.0), "weight": randn(64, std=0.5, offset=1.0), "bias": randn(64)},
         args={"groups": 32, "eps": 1e-5})

    # --- layer norm over the last dim ---
    def ln_affine(x, weight, bias):
        return F.layer_norm(x, (48,), weight, bias, 1e-5)
    save("layernorm_affine", ln_affine,
         {"x": randn(77, 48, std=1.5, offset=-0.3), "weight": randn(48, std=0.5, offset=1.0), "bias": randn(48)},
         args={"eps": 1e-5})

    def ln_plain(x):
        return F.layer_norm(x, (48,), None, None, 1e-5)
    save("layernorm_plain", ln_plain, {"x": randn(2, 3, 48)}, args={"eps": 1e-5})

    def ln_offset(x, weight, bias):
        return F.layer_norm(x, (48,), weight, bias, 1e-5)
    save("layernorm_offset", ln_offset,
         {"x": randn(6, 48, offset=50.0), "weight": randn(48, std=0.5, offset=1.0), "bias": randn(48)},
         args={"eps": 1e-5})

    # --- activations: std 4 reaches the saturated tails; the last row adds ±12 and ±30 extremes ---
    def act_input():
        x = randn(5, 37, std=4.0)
        x[4, :4] = torch.tensor([12.0, -12.0, 30.0, -30.0])
        return x

    def silu(x):
        return F.silu(x)
    save("silu", silu, {"x": act_input()})

    def gelu(x):
        return F.gelu(x)
    save("gelu", gelu, {"x": act_input()})

    def gelu_tanh(x):
        return F.gelu(x, approximate="tanh")
    save("gelu_tanh", gelu_tanh, {"x": act_input()})

    def quickgelu(x):
        return x * torch.sigmoid(1.702 * x)
    save("quickgelu", quickgelu, {"x": act_input()})

    # diffusers' GEGLU after its projection: hidden, gate = proj(x).chunk(2, dim=-1)
    def geglu(x):
        hidden, gate = x.chunk(2, dim=-1)
        return hidden * F.gelu(gate)
    save("geglu", geglu, {"x": randn(2, 5, 2 * 24, std=2.0)})
