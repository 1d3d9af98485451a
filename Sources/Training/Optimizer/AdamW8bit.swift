import Distributed
import Foundation

/// bitsandbytes' block-wise dynamic 8-bit quantisation (bitsandbytes 0.50.2, CPU backend).
public enum BlockwiseQuantization {
    /// Elements per absmax block: bnb's Optimizer2State.init_state and the CPU
    /// `_optimizer_update_8bit_blockwise_cpu` (bitsandbytes/backends/cpu/ops.py) both use 256.
    public static let blockSize = 256

    /// bitsandbytes/functional.py `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`:
    /// 256 sorted values in [-1, 1] (signed) or [0, 1] (unsigned). torch builds the fraction boundaries with
    /// fp32 `torch.linspace`, averages neighbours in fp32 and scales by 10^e in fp32; this repeats that with
    /// linspace's scalar formula. torch's vectorised linspace kernel (AVX2 vs AVX512 differ) rounds some
    /// boundaries of the 9+ point spaces 1 ulp differently, so a few map values differ from bnb's by up to 2 ulp
    /// (about 2e-7 relative); the 8-bit codes it produces still equal bnb's (see OptimizerTests).
    public static func dynamicMap(signed: Bool) -> [Float] {
        let maxExponentBits = 7, totalBits = 8
        let nonSignBits = totalBits - 1
        let additionalItems = (1 << (nonSignBits - maxExponentBits)) - 1
        var data: [Float] = []
        for i in 0..<maxExponentBits {
            let fractionItems = signed
                ? (1 << (i + nonSignBits - maxExponentBits)) + 1
                : (1 << (i + nonSignBits - maxExponentBits + 1)) + 1
            let boundaries = linspace(0.1, 1, fractionItems)
            let scale = Float(pow(10.0, Double(-(maxExponentBits - 1) + i)))
            for k in 0..<(boundaries.count - 1) {
                let mean = (boundaries[k] + boundaries[k + 1]) / 2
                data.append(scale * mean)
            }
            if signed {
                for k in 0..<(boundaries.count - 1) {
                    let mean = (boundaries[k] + boundaries[k + 1]) / 2
                    data.append(-scale * mean)
                }
            }
        }
        if additionalItems > 0 {
            // not reached for 8 bits with 7 exponent bits (additional_items = 0), kept for the formula
            let boundaries = linspace(0.1, 1, additionalItems + 1)
            let scale = Float(pow(10.0, Double(-(maxExponentBits - 1) + maxExponentBits - 1)))
            for k in 0..<(boundaries.count - 1) {
                let mean = (boundaries[k] + boundaries[k + 1]) / 2
                data.append(scale * mean)
                if signed { data.append(-scale * mean) }
            }
        }
        data.append(0)
        data.append(1)
        while data.count < 256 { data.append(0) }
        return data.sorted()
    }

    /// torch.linspace(start, end, steps, dtype=float32) on CPU: step = (end - start) / (steps - 1) in fp32,
    /// the first half counted up from start, the second half down from end.
    static func linspace(_ start: Float, _ end: Float, _ steps: Int) -> [Float] {
        if steps == 1 { return [start] }
        let step = (end - start) / Float(steps - 1)
        let halfway = steps / 2
        return (0..<steps).map { i in i < halfway ? start + step * Float(i) : end - step * Float(steps - i - 1) }
    }

    /// Nearest-code lookup table: csrc/cpu_ops.cpp `build_quantize_lut` — the [-1, 1] range split into 65536
    /// bins, each mapped to the code whose neighbourhood (midpoints between sorted codes) contains it.
    static func lookupTable(_ code: [Float]) -> [UInt8] {
        precondition(code.count == 256)
        var midpoints = [Float](repeating: 0, count: 255)
        for i in 0..<255 { midpoints[i] = 0.5 * (code[i] + code[i + 1]) }
        var lut = [UInt8](repeating: 0, count: 65536)
        var codeIndex = 0
        for i in 0..<65536 {
            let value = -1 + (2 * Float(i)) / Float(65535)
            while codeIndex < 255 && midpoints[codeIndex] < value { codeIndex += 1 }
            lut[i] = UInt8(codeIndex)
        }
        return lut
    }

    /// csrc/cpu_ops.cpp `norm_to_lut_index`: clamp to [-1, 1], then (v + 1) · 0.5 · 65535 + 0.5 truncated,
    /// each operation rounded to fp32 (no fused multiply-add: this reproduces bnb 0.50.2's CPU codes exactly
    /// on the fixture's values, OptimizerTests.testBlockwiseQuantizationEqualsBitsandbytesCPU).
    @inline(__always)
    static func lutIndex(_ normalized: Float) -> Int {
        let v = min(max(normalized, -1), 1)
        return Int((v + 1) * 0.5 * 65535 + 0.5)
    }

    /// csrc/cpu_ops.cpp `quantize_cpu_impl`: per block of `blockSize`, absmax = max |x|, codes =
    /// lut[index(x · (1 / absmax))]; an all-zero block gets absmax 0 and codes 0.
    public static func quantize(_ values: UnsafeBufferPointer<Float>, lut: [UInt8],
                                codes: UnsafeMutableBufferPointer<UInt8>, absmax: UnsafeMutableBufferPointer<Float>) {
        let n = values.count
        let blocks = (n + blockSize - 1) / blockSize
        precondition(codes.count == n && absmax.count == blocks)
        for b in 0..<blocks {
            let lo = b * blockSize, hi = min(lo + blockSize, n)
            var blockMax: Float = 0
            for i in lo..<hi { blockMax = max(blockMax, abs(values[i])) }
            absmax[b] = blockMax
            if blockMax == 0 {
                for i in lo..<hi { codes[i] = 0 }
                continue
            }
            let inverse = 1 / blockMax
            for i in lo..<hi { codes[i] = lut[lutIndex(values[i] * inverse)] }
        }
    }

    /// csrc/cpu_ops.cpp `dequantizeBlockwise8bitCpu`: code[q] · absmax[block].
    public static func dequantize(codes: UnsafeBufferPointer<UInt8>, absmax: UnsafeBufferPointer<Float>, map: [Float],
                                  into out: UnsafeMutableBufferPointer<Float>) {
        for i in 0..<codes.count { out[i] = map[Int(codes[i])] * absmax[i / blockSize] }
    }

    /// Array conveniences (tests, tools).
    public static func quantize(_ values: [Float], map: [Float]) -> (codes: [UInt8], absmax: [Float]) {
        let lut = lookupTable(map)
        var codes = [UInt8](repeating: 0, count: values.count)
        var absmax = [Float](repeating: 0, count: (values.count + blockSize - 1) / blockSize)
        values.withUnsafeBufferPointer { v in
            codes.withUnsafeMutableBufferPointer { c in
                absmax.withUnsafeMutableBufferPointer { a in quantize(v, lut: lut, codes: c, absmax: a) }
            }
        }
        return (codes, absmax)
    }

    public static func dequantize(codes: [UInt8], absmax: [Float], map: [Float]) -> [Float] {
        var out = [Float](repeating: 0, count: codes.count)
        codes.withUnsafeBufferPointer { c in
            absmax.withUnsafeBufferPointer { a in
                out.withUnsafeMutableBufferPointer { o in dequantize(codes: c, absmax: a, map: map, into: o) }
            }
        }
        return out
    }
}

/// bitsandbytes.optim.AdamW8bit 0.50.2 on its CPU backend (what kohya's `AdamW8bit` runs when no GPU):
/// tensors with fewer than `min_8bit_size` (4096) elements keep fp32 moments and take
/// `_optimizer_update_32bit_cpu`; larger ones keep block-wise 8-bit moments (signed dynamic map for m,
/// unsigned for v, 256-element blocks with an fp32 absmax each) and take `_optimizer_update_8bit_blockwise_cpu`
/// (bitsandbytes/backends/cpu/ops.py): dequantise, Adam update in fp32, quantise again.
/// Args: betas=(0.9,0.999), eps=1e-8, weight_decay=0.01, min_8bit_size=4096, amsgrad=False (only),
/// optim_bits=32 (only), is_paged (no effect on CPU).
public final class AdamW8bit: Optimizer {
    public let name = "AdamW8bit"
    public let layout: ParameterLayout
    public let beta1: Double, beta2: Double, eps: Double, weightDecay: Double
    public let min8bitSize: Int
    public private(set) var stepCount: Int = 0
    /// Per entry: whether its moments are 8-bit, and where they live in the fp32 or 8-bit arrays.
    let quantized: [Bool]
    let fp32Offsets: [Int], codeOffsets: [Int], blockOffsets: [Int]
    var state1: [Float], state2: [Float]          // fp32 moments of the small entries, concatenated
    var codes1: [UInt8], codes2: [UInt8]          // 8-bit moments of the large entries, concatenated
    var absmax1: [Float], absmax2: [Float]        // one per 256-element block of each large entry
    let signedMap: [Float], unsignedMap: [Float]
    let signedLUT: [UInt8], unsignedLUT: [UInt8]

    static let accepted = ["betas", "eps", "weight_decay", "min_8bit_size", "amsgrad", "optim_bits", "is_paged"]

    public init(layout: ParameterLayout, betas: (Double, Double) = (0.9, 0.999), eps: Double = 1e-8,
                weightDecay: Double = 0.01, min8bitSize: Int = 4096) throws {
        guard eps >= 0 else { throw OptimizerError("AdamW8bit: eps=\(eps) must be >= 0") }
        guard (0..<1).contains(betas.0), (0..<1).contains(betas.1) else {
            throw OptimizerError("AdamW8bit: betas=(\(betas.0), \(betas.1)) must be in [0, 1)")
        }
        guard weightDecay >= 0 else { throw OptimizerError("AdamW8bit: weight_decay=\(weightDecay) must be >= 0") }
        self.layout = layout
        beta1 = betas.0; beta2 = betas.1
        self.eps = eps; self.weightDecay = weightDecay; self.min8bitSize = min8bitSize
        var q: [Bool] = [], f: [Int] = [], c: [Int] = [], b: [Int] = []
        var nf = 0, nc = 0, nb = 0
        for e in layout.entries {
            let is8 = e.count >= min8bitSize
            q.append(is8); f.append(nf); c.append(nc); b.append(nb)
            if is8 {
                nc += e.count
                nb += (e.count + BlockwiseQuantization.blockSize - 1) / BlockwiseQuantization.blockSize
            } else {
                nf += e.count
            }
        }
        quantized = q; fp32Offsets = f; codeOffsets = c; blockOffsets = b
        state1 = [Float](repeating: 0, count: nf); state2 = [Float](repeating: 0, count: nf)
        codes1 = [UInt8](repeating: 0, count: nc); codes2 = [UInt8](repeating: 0, count: nc)
        absmax1 = [Float](repeating: 0, count: nb); absmax2 = [Float](repeating: 0, count: nb)
        signedMap = BlockwiseQuantization.dynamicMap(signed: true)
        unsignedMap = BlockwiseQuantization.dynamicMap(signed: false)
        signedLUT = BlockwiseQuantization.lookupTable(signedMap)
        unsignedLUT = BlockwiseQuantization.lookupTable(unsignedMap)
    }

    convenience init(layout: ParameterLayout, args: OptimizerArgs) throws {
        var a = args
        let betas = try a.doubles("betas", [0.9, 0.999], counts: 2...2)
        let eps = try a.double("eps", 1e-8)
        let wd = try a.double("weight_decay", 0.01)
        let minSize = try a.int("min_8bit_size", 4096)
        let ams = try a.bool("amsgrad", false)
        let bits = try a.int("optim_bits", 32)
        _ = try a.bool("is_paged", false)
        try a.finish(optimizer: "AdamW8bit (bitsandbytes.optim.AdamW8bit)", accepted: AdamW8bit.accepted)
        if ams { throw OptimizerError("AdamW8bit does not support amsgrad=True (bitsandbytes refuses it)") }
        if bits != 32 { throw OptimizerError("AdamW8bit only accepts optim_bits=32 (bitsandbytes refuses others)") }
        try self.init(layout: layout, betas: (betas[0], betas[1]), eps: eps, weightDecay: wd, min8bitSize: minSize)
    }

    public func step(parameters: inout [Float], gradients: [Float], learningRates: [Double]) {
        checkStepInputs(name, layout: layout, parameters: parameters.count, gradients: gradients.count,
                        learningRates: learningRates.count)
        stepCount += 1
        let step = Double(stepCount)
        let correction1 = 1 - pow(beta1, step)
        let correction2 = (1 - pow(beta2, step)).squareRoot()
        let b1 = Float(beta1), oneMinusB1 = Float(1 - beta1), b2 = Float(beta2), oneMinusB2 = Float(1 - beta2)
        let entries = layout.entries
        let weightDecay = self.weightDecay, eps = self.eps
        let quantized = self.quantized, fp32Offsets = self.fp32Offsets
        let codeOffsets = self.codeOffsets, blockOffsets = self.blockOffsets
        let signedMap = self.signedMap, unsignedMap = self.unsignedMap
        let signedLUT = self.signedLUT, unsignedLUT = self.unsignedLUT
        let blockSize = BlockwiseQuantization.blockSize
        parameters.withUnsafeMutableBufferPointer { p in
          gradients.withUnsafeBufferPointer { g in
            state1.withUnsafeMutableBufferPointer { s1 in
              state2.withUnsafeMutableBufferPointer { s2 in
                codes1.withUnsafeMutableBufferPointer { q1 in
                  codes2.withUnsafeMutableBufferPointer { q2 in
                    absmax1.withUnsafeMutableBufferPointer { a1 in
                      absmax2.withUnsafeMutableBufferPointer { a2 in
                        forEachEntryConcurrently(entries.count) { e in
                            let entry = entries[e]
                            let lr = learningRates[entry.group]
                            let n = entry.count, o = entry.offset
                            let decay = Float(1 - lr * weightDecay)
                            if !quantized[e] {
                                // _optimizer_update_32bit_cpu, "adam"
                                let f = fp32Offsets[e]
                                let stepSize = Float(-lr * correction2 / correction1)
                                let epsTerm = Float(eps * correction2)
                                for i in 0..<n {
                                    let gi = g[o + i]
                                    s1[f + i] = s1[f + i] * b1 + oneMinusB1 * gi
                                    s2[f + i] = s2[f + i] * b2 + oneMinusB2 * gi * gi
                                    if weightDecay > 0 { p[o + i] *= decay }
                                    let update = s1[f + i] / (s2[f + i].squareRoot() + epsTerm)
                                    p[o + i] = p[o + i] + stepSize * update
                                }
                                return
                            }
                            // _optimizer_update_8bit_blockwise_cpu, "adam"
                            let c = codeOffsets[e], b = blockOffsets[e]
                            let blocks = (n + blockSize - 1) / blockSize
                            var m = [Float](repeating: 0, count: n), v = [Float](repeating: 0, count: n)
                            m.withUnsafeMutableBufferPointer { mv in
                                v.withUnsafeMutableBufferPointer { vv in
                                    BlockwiseQuantization.dequantize(
                                        codes: UnsafeBufferPointer(rebasing: q1[c..<(c + n)]),
                                        absmax: UnsafeBufferPointer(rebasing: a1[b..<(b + blocks)]), map: signedMap, into: mv)
                                    BlockwiseQuantization.dequantize(
                                        codes: UnsafeBufferPointer(rebasing: q2[c..<(c + n)]),
                                        absmax: UnsafeBufferPointer(rebasing: a2[b..<(b + blocks)]), map: unsignedMap, into: vv)
                                    let c2 = Float(correction2), epsF = Float(eps)
                                    let stepSize = Float(-lr / correction1)
                                    for i in 0..<n {
                                        let gi = g[o + i]
                                        mv[i] = mv[i] * b1 + oneMinusB1 * gi
                                        vv[i] = vv[i] * b2 + oneMinusB2 * gi * gi
                                        let denom = vv[i].squareRoot() / c2 + epsF
                                        if weightDecay > 0 { p[o + i] *= decay }
                                        p[o + i] = p[o + i] + stepSize * (mv[i] / denom)
                                    }
                                    BlockwiseQuantization.quantize(
                                        UnsafeBufferPointer(mv), lut: signedLUT,
                                        codes: UnsafeMutableBufferPointer(rebasing: q1[c..<(c + n)]),
                                        absmax: UnsafeMutableBufferPointer(rebasing: a1[b..<(b + blocks)]))
                                    BlockwiseQuantization.quantize(
                                        UnsafeBufferPointer(vv), lut: unsignedLUT,
                                        codes: UnsafeMutableBufferPointer(rebasing: q2[c..<(c + n)]),
                                        absmax: UnsafeMutableBufferPointer(rebasing: a2[b..<(b + blocks)]))
                                }
                            }
                        }
                      }
                    }
                  }
                }
              }
            }
          }
        }
    }

    public func stateBlobs() -> StateBlobList {
        [
            ("step", StateBlob.bytes([Int64(stepCount)])),
            ("state1_fp32", StateBlob.bytes(state1)), ("state2_fp32", StateBlob.bytes(state2)),
            ("state1_codes", codes1), ("state2_codes", codes2),
            ("absmax1", StateBlob.bytes(absmax1)), ("absmax2", StateBlob.bytes(absmax2)),
        ]
    }

    public func restore(_ blobs: [String: [UInt8]]) throws {
        let step = try StateBlob.int64s(blobs, "step", count: 1, optimizer: name)[0]
        let s1 = try StateBlob.floats(blobs, "state1_fp32", count: state1.count, optimizer: name)
        let s2 = try StateBlob.floats(blobs, "state2_fp32", count: state2.count, optimizer: name)
        let q1 = try StateBlob.raw(blobs, "state1_codes", count: codes1.count, optimizer: name)
        let q2 = try StateBlob.raw(blobs, "state2_codes", count: codes2.count, optimizer: name)
        let a1 = try StateBlob.floats(blobs, "absmax1", count: absmax1.count, optimizer: name)
        let a2 = try StateBlob.floats(blobs, "absmax2", count: absmax2.count, optimizer: name)
        stepCount = Int(step); state1 = s1; state2 = s2; codes1 = q1; codes2 = q2; absmax1 = a1; absmax2 = a2
    }

    public func effectiveLearningRates(_ learningRates: [Double]) -> [Double] { learningRates }
}
