"""Golden cases for Attention (scaled dot-product, heads interleaved in the channel dim) and Softmax."""
import torch
import torch.nn.functional as F


def attention(heads, causal=False, scale=None):
    def fn(q, k, v):
        B, Nq, C = q.shape
        Nk, D = k.shape[1], C // heads
        qh = q.view(B, Nq, heads, D).transpose(1, 2)
        kh = k.view(B, Nk, heads, D).transpose(1, 2)
        vh = v.view(B, Nk, heads, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
        s = (qh @ kh.transpose(-1, -2)) * (scale if scale is not None else D ** -0.5)
        if causal:
            s = s.masked_fill(torch.ones(Nq, Nk, dtype=torch.bool).triu(1), float("-inf"))
        lse = torch.logsumexp(s, dim=-1).detach()   # [B, H, Nq]; detached: not part of the loss
        return {"out": o.transpose(1, 2).reshape(B, Nq, C), "lse": lse}
    return fn


def softmax(x):
    return torch.softmax(x, dim=-1)


def cases(save):
    g = torch.Generator().manual_seed(20240611)

    def qkv(B, Nq, Nk, C):
        return {"q": torch.randn(B, Nq, C, generator=g), "k": torch.randn(B, Nk, C, generator=g),
                "v": torch.randn(B, Nk, C, generator=g)}

    # N = 77 (CLIP's length) and 150 (crosses the 128-row query tile); D = 4 and 8.
    save("attention_self_n77", attention(3), qkv(2, 77, 77, 12), args={"heads": 3, "causal": False})
    save("attention_self_n150", attention(2), qkv(1, 150, 150, 16), args={"heads": 2, "causal": False})
    save("attention_cross", attention(2, scale=0.3), qkv(2, 50, 77, 16),
         args={"heads": 2, "causal": False, "scale": 0.3})
    save("attention_causal_n77", attention(3, causal=True), qkv(2, 77, 77, 12), args={"heads": 3, "causal": True})

    save("softmax_rows7", softmax, {"x": torch.randn(3, 5, 7, generator=g) * 3})
    save("softmax_rows33", softmax, {"x": torch.randn(4, 33, generator=g) * 3})
    save("softmax_rows100", softmax, {"x": torch.randn(2, 3, 100, generator=g) * 3})
