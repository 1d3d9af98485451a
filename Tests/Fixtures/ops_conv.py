"""Golden cases for Conv2d (F.conv2d) and Upsample (nearest 2x): batch 2, 6 -> 10 channels (not multiples
of 8), odd spatial size 9x7, every kernel/stride/padding the SDXL UNet and VAE use, with and without bias."""
import torch
import torch.nn.functional as F


def cases(save):
    g = torch.Generator().manual_seed(20240611)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    for k, s, p in [(1, 1, 0), (3, 1, 1), (3, 2, 1), (3, 2, 0), (3, 1, 0), (1, 2, 0)]:
        for bias in (True, False):
            if (k, s, p) in [(3, 1, 0), (1, 2, 0)] and not bias:
                continue
            inputs = {"x": randn(2, 6, 9, 7), "w": randn(10, 6, k, k) * 0.3}
            if bias:
                inputs["b"] = randn(10)

                def fn(x, w, b, s=s, p=p):
                    return F.conv2d(x, w, b, stride=s, padding=p)
            else:
                def fn(x, w, s=s, p=p):
                    return F.conv2d(x, w, None, stride=s, padding=p)
            name = f"conv_k{k}s{s}p{p}_{'bias' if bias else 'nobias'}"
            save(name, fn, inputs, args={"stride": s, "padding": p})

    # A weight stored in fp16 (rounded here, so the fp16 copy Swift makes of it is exact): it is
    # widened per call, and the result matches fp32 on the same values.
    def fn(x, w, b):
        return F.conv2d(x, w, b, stride=1, padding=1)
    save("conv_k3s1p1_f16w", fn, {"x": randn(1, 5, 6, 8), "w": (randn(4, 5, 3, 3) * 0.3).half().float(),
                                  "b": randn(4)}, args={"stride": 1, "padding": 1})

    def fn(x):
        return F.interpolate(x, scale_factor=2, mode="nearest")
    save("upsample_nearest2x", fn, {"x": randn(2, 3, 5, 7)})
