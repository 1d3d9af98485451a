import Foundation

/// PyTorch's CPU generator (`torch.Generator().manual_seed(seed)`), for the draws that must equal PyTorch's: the
/// initial latents and per-step noise of image generation, so a seed means what it means in diffusers on CPU and in
/// ComfyUI (whose noise is `torch.randn(..., generator=torch.manual_seed(seed), device="cpu")`).
///
/// ATen's at::mt19937 (MT19937RNGEngine.h: the standard Mersenne Twister, seeded with the seed's low 32 bits) and
/// `normal_` on a float32 tensor of 16 or more elements (aten/src/ATen/native/cpu/DistributionTemplates.h
/// `normal_fill`): every element first gets a uniform (`(random() & (2²⁴ − 1)) · 2⁻²⁴`), then each block of 16 is
/// turned into normals by Box–Muller, pairing element j with j + 8; when the count is not a multiple of 16 the last 16
/// elements are drawn again and transformed again. PyTorch's AVX2 build evaluates log/sin/cos with vectorised
/// approximations, so values agree to ~1e-6, not bit for bit.
public struct TorchGenerator: Sendable {
    private var state = [UInt32](repeating: 0, count: 624)
    private var index = 624

    public init(seed: UInt64) {
        state[0] = UInt32(truncatingIfNeeded: seed)
        for j in 1..<624 {
            state[j] = 1_812_433_253 &* (state[j - 1] ^ (state[j - 1] >> 30)) &+ UInt32(j)
        }
        index = 624
    }

    /// The next 32-bit output (`generator->random()`).
    public mutating func nextUInt32() -> UInt32 {
        if index >= 624 { twist() }
        var y = state[index]
        index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C_5680
        y ^= (y << 15) & 0xEFC6_0000
        y ^= y >> 18
        return y
    }

    private mutating func twist() {
        for i in 0..<624 {
            let y = (state[i] & 0x8000_0000) | (state[(i + 1) % 624] & 0x7FFF_FFFF)
            var next = state[(i + 397) % 624] ^ (y >> 1)
            if y & 1 != 0 { next ^= 0x9908_B0DF }
            state[i] = next
        }
        index = 0
    }

    /// at::uniform_real_distribution<float>(0, 1).
    private mutating func uniform() -> Float { Float(nextUInt32() & 0xFF_FFFF) * 0x1p-24 }

    /// `torch.randn(count, generator=self)` for a float32 tensor of `count` ≥ 16 elements (the row-major order of any
    /// shape with that many elements).
    public mutating func randn(count: Int) -> [Float] {
        precondition(count >= 16, "TorchGenerator.randn follows PyTorch's path for 16 or more elements (got \(count))")
        var data = (0..<count).map { _ in uniform() }
        func fill16(_ start: Int) {
            for j in 0..<8 {
                let u1 = 1 - data[start + j], u2 = data[start + j + 8]
                let radius = (-2 * log(u1)).squareRoot()
                let theta = Float(2 * Double.pi * Double(u2))
                data[start + j] = radius * cos(theta)
                data[start + j + 8] = radius * sin(theta)
            }
        }
        var i = 0
        while i + 16 <= count { fill16(i); i += 16 }
        if count % 16 != 0 {
            for j in count - 16..<count { data[j] = uniform() }
            fill16(count - 16)
        }
        return data
    }
}
