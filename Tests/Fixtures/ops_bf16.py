"""Golden cases for the bf16 kernel family: the same ops under torch.autocast("cpu", dtype=torch.bfloat16), which
runs linear, matmul and conv2d with bf16 inputs and fp32 accumulation and returns bf16 outputs (and bf16 gradients
for their inputs, cast back to fp32 at fp32 leaves). Shapes are big enough for oneDNN's blocked kernels (K ≥ 64).
Attention: F.scaled_dot_product_attention under autocast (q, k, v cast to bf16; PyTorch's CPU flash-attention kernel
with fp32 softmax), heads interleaved in the channel dim as lora-dist lays them out."""
import torch
import torch.nn.functional as F


def autocast(fn):
    def run(**kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(**kw)
        return out.float() if torch.is_tensor(out) else {k: v.float() for k, v in out.items()}
    return run


def attention(heads, causal=False):
    def fn(q, k, v):
        B, Nq, C = q.shape
        Nk, D = k.shape[1], C // heads
        qh, kh, vh = (t.view(B, -1, heads, D).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal).transpose(1, 2).reshape(B, Nq, C)
    return fn


def cases(save):
    r = torch.randn
    save("bf16_linear_bias", autocast(lambda x, w, b: F.linear(x, w, b)),
         {"x": r(2, 37, 160), "w": r(96, 160) / 12, "b": r(96)})
    # A kohya LoRA on a frozen linear: base(x) + scale·up(down(x)), scale = alpha/rank = 8/4
    save("bf16_lora_linear",
         autocast(lambda x, w, b, down, up: F.linear(x, w, b) + 2.0 * F.linear(F.linear(x, down), up)),
         {"x": r(2, 70, 128), "w": r(80, 128) / 11, "b": r(80), "down": r(4, 128) / 11, "up": r(80, 4) / 2},
         args={"scale": 2.0}, grad_inputs=["x", "down", "up"])
    for ta, tb in ((False, False), (True, True)):
        if True:
            a = r(80, 70) if ta else r(70, 80)
            b = r(48, 80) if tb else r(80, 48)
            save(f"bf16_matmul_{int(ta)}{int(tb)}",
                 autocast(lambda a, b, ta=ta, tb=tb: (a.t() if ta else a) @ (b.t() if tb else b)),
                 {"a": a, "b": b}, args={"transA": ta, "transB": tb})
    # Frozen kernels (what LoRA training convolves with): the input gradient only.
    for k, s, p, name in [(3, 1, 1, "k3s1p1"), (3, 2, 1, "k3s2p1"), (1, 1, 0, "k1s1p0")]:
        save(f"bf16_conv_{name}", autocast(lambda x, w, b, s=s, p=p: F.conv2d(x, w, b, stride=s, padding=p)),
             {"x": r(2, 64, 12, 10), "w": r(48, 64, k, k) / (8 * k), "b": r(48)},
             args={"stride": s, "padding": p}, grad_inputs=["x"])
    # Attention with D = 64 (SDXL's head size): self-attention over 150 tokens, cross-attention to 77 (the text
    # context), and CLIP's causal self-attention over 77.
    for name, (B, Nq, Nk), causal in [("self", (1, 150, 150), False), ("cross", (2, 64, 77), False),
                                      ("causal", (1, 77, 77), True)]:
        save(f"bf16_attention_{name}", autocast(attention(2, causal)),
             {"q": r(B, Nq, 128), "k": r(B, Nk, 128), "v": r(B, Nk, 128)}, args={"heads": 2, "causal": causal})
