import Foundation

/// How gradients travel between ranks (the config's `wire_format`).
public enum WireFormat: String, CaseIterable, Sendable {
    /// Plain MPI_Allreduce of fp32 (the baseline; MPI picks the reduction order).
    case none
    /// Lossless: byte-grouped fp32 + zstd; bit-equal to an uncompressed sum in the same fixed order.
    case fp32
    /// Each rank's contribution rounded to bf16 (error feedback keeps what was rounded away for the next
    /// step), byte-grouped + zstd; sums are fp32 over the bf16-decoded values.
    case bf16
}

/// Weighted average of one flat fp32 gradient buffer over all ranks, compressed on the wire.
///
/// Result on every rank, bit-identical: buffer ← (Σ_r v_r) / S with v_r = Float(samples_r) · x_r in fp32,
/// S = Σ_r samples_r, x_r = the rank's gradient (fp32) or its bf16 rounding (bf16 format), and Σ in a fixed
/// order that depends only on the algorithm, never on message timing:
/// - `.ring`: reduce-scatter + all-gather over point-to-point. The buffer is cut into `size` chunks
///   (chunk c = [c·N/size, (c+1)·N/size)); chunk c is summed in ring order c, c+1, …, c+size−1 (mod size),
///   ((v_c + v_{c+1}) + v_{c+2}) + …; its final value is made once by rank (c+size−1) mod size and passed
///   on losslessly, so every rank holds the same bits. Partial sums travel as byte-grouped fp32 + zstd (for
///   both compressed formats: a sum of bf16 values is not a bf16 value, and rounding it would add error
///   the feedback cannot see). Each chunk is sent in pieces of `pieceElements`; piece j+1 is compressed
///   while piece j's MPI_Isend is in flight.
/// - `.allGather`: every rank's compressed contribution goes to every rank (MPI_Allgatherv); each rank
///   decodes all of them and sums in rank order 0, 1, …, size−1. The bf16 format sends bf16 here (half the
///   bytes before zstd); the receiver applies the sender's sample count.
/// - `.auto`: the ring (see `Algorithm.resolved` for the measurements behind the rule).
public final class GradientAllReduce {
    public enum Algorithm: String, CaseIterable, Sendable {
        case ring, allGather, auto

        /// The rule behind `.auto`: always the ring. Measured (bench/RESULTS.md "Gradient all-reduce",
        /// 42.6 M floats, np = 2 and 3, loopback and tc-shaped 10/1 Gbit/s links): all-gather compresses
        /// the whole buffer once but every rank then decodes and adds (size−1) full buffers and receives
        /// (size−1)·B bytes, against the ring's 2(size−1)/size·B with the compression work spread over
        /// pieces that overlap the sends; on this 2-core machine compression time dominates and the ring was
        /// faster in every measured case, bf16 included (where all-gather sends bf16 rather than partial
        /// sums in fp32). All-gather stays selectable for hosts where the link, not the CPU, is the limit.
        public func resolved(format: WireFormat, worldSize: Int) -> Algorithm {
            self == .auto ? .ring : self
        }
    }

    public struct Stats: Sendable {
        /// Algorithm actually run (`.auto` resolved; `.allGather`/`.ring` irrelevant for `none`).
        public var algorithm: Algorithm
        /// Bytes this rank put on the wire (frames incl. 9-byte headers); for `none`, the ring-equivalent
        /// 2(size−1)/size · 4N that MPI_Allreduce moves per rank at best.
        public var bytesSent: Int
        /// What those messages would have been as plain fp32.
        public var rawBytes: Int
        public var seconds: Double
        public var compressionRatio: Double { bytesSent == 0 ? 1 : Double(rawBytes) / Double(bytesSent) }

        public init(algorithm: Algorithm, bytesSent: Int = 0, rawBytes: Int = 0, seconds: Double = 0) {
            self.algorithm = algorithm
            self.bytesSent = bytesSent
            self.rawBytes = rawBytes
            self.seconds = seconds
        }
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public let communicator: any Communicator
    public let count: Int
    public let format: WireFormat
    public let zstdLevel: Int32
    public let algorithm: Algorithm
    public let pieceElements: Int
    public let errorFeedback: Bool
    /// bf16 only: per-rank residual (what rounding removed last step), added to the next step's gradient.
    public private(set) var residual: [Float]

    /// Collective: every rank must construct it with the same `count` (checked here, one Int64 all-reduce).
    /// `pieceElements`: floats per point-to-point message in the ring (default 1 Mi = 4 MB raw).
    /// `errorFeedback: false` exists for tests and the benchmark (showing why it is on).
    public init(communicator: any Communicator, count: Int, format: WireFormat, zstdLevel: Int32 = 1,
                algorithm: Algorithm = .auto, pieceElements: Int = 1 << 20, errorFeedback: Bool = true) throws {
        guard count >= 0 else { throw Failure(description: "gradient all-reduce: count \(count) is negative") }
        guard pieceElements > 0 else {
            throw Failure(description: "gradient all-reduce: pieceElements \(pieceElements) must be positive")
        }
        guard (-7...22).contains(zstdLevel) else {
            throw Failure(description: "gradient all-reduce: zstd level \(zstdLevel) outside -7...22; 1 is the default")
        }
        let extremes = try communicator.allReduce([Int64(count), -Int64(count)], op: .max)
        guard extremes[0] == Int64(count), -extremes[1] == Int64(count) else {
            throw Failure(description: "gradient all-reduce: ranks disagree on the gradient size (\(-extremes[1])..."
                + "\(extremes[0]) floats; rank \(communicator.rank) has \(count)); every rank must train the same LoRA")
        }
        self.communicator = communicator
        self.count = count
        self.format = format
        self.zstdLevel = zstdLevel
        self.algorithm = algorithm
        self.pieceElements = pieceElements
        self.errorFeedback = errorFeedback
        self.residual = format == .bf16 && errorFeedback ? [Float](repeating: 0, count: count) : []
    }

    /// Puts back a residual saved from an earlier run (bf16 error feedback), so a resumed run continues exactly.
    public func restoreResidual(_ values: [Float]) throws {
        guard format == .bf16 && errorFeedback else { return }
        guard values.count == count else {
            throw Failure(description: "gradient all-reduce: saved residual has \(values.count) floats, this reducer has \(count)")
        }
        residual = values
    }

    /// In place: buffer ← Σ_r samples_r · buffer_r / Σ_r samples_r (identical bits on every rank).
    /// Collective; `samples` ≥ 0 is this rank's real sample count (0: contributes nothing), the total > 0.
    public func average(_ buffer: inout [Float], samples: Int) throws -> Stats {
        guard samples >= 0 else { throw Failure(description: "gradient all-reduce: samples \(samples) is negative") }
        let total = try communicator.allReduce([Int64(samples)], op: .sum)[0]
        guard total > 0 else {
            throw Failure(description: "gradient all-reduce: no rank had samples this step (total 0); skip the step instead")
        }
        let stats = try reduce(&buffer, weight: samples, segments: nil)
        let divisor = Float(total)
        for i in 0..<count { buffer[i] = buffer[i] / divisor }
        return stats
    }

    /// In place: buffer ← Σ_r buffer_r (identical bits on every rank): the training loop's gradient sums, divided by
    /// the total sample count once by the caller. Collective.
    public func sum(_ buffer: inout [Float]) throws -> Stats {
        try reduce(&buffer, weight: 1, segments: nil)
    }

    /// One bucket of the overlapped reduction (GradientBuckets): `values` ← Σ_r values_r, where `values` is the
    /// concatenation of the full gradient's `segments` (ranges of 0..<count, in the bucket's order). bf16 error feedback
    /// uses and updates those segments' residuals, so a run's residual does not depend on how it was bucketed. The
    /// ring's chunks are this bucket's, so with 3+ ranks an element's sum may associate differently than in one
    /// whole-buffer reduction (2 ranks: a + b = b + a, the same bits); fixed for a run, identical on every rank.
    /// Collective: every rank passes the same segments.
    public func sum(_ values: inout [Float], segments: [Range<Int>]) throws -> Stats {
        try reduce(&values, weight: 1, segments: segments)
    }

    /// buffer ← Σ_r weight_r · x_r, the sum in the algorithm's fixed order (x_r: the rank's values, or their bf16
    /// rounding with error feedback).
    private func reduce(_ buffer: inout [Float], weight samples: Int, segments: [Range<Int>]?) throws -> Stats {
        let start = DispatchTime.now().uptimeNanoseconds
        let length = buffer.count
        if let segments {
            guard segments.allSatisfy({ $0.lowerBound >= 0 && $0.upperBound <= count }),
                  segments.reduce(0, { $0 + $1.count }) == length else {
                throw Failure(description: "gradient all-reduce: a bucket of \(length) floats does not match its segments \(segments) of 0..<\(count)")
            }
        } else {
            guard length == count else {
                throw Failure(description: "gradient all-reduce: buffer has \(length) floats, this reducer was built for \(count)")
            }
        }
        let weight = Float(samples)
        let n = communicator.size
        let resolved = algorithm.resolved(format: format, worldSize: n)
        var stats = Stats(algorithm: resolved, bytesSent: 0, rawBytes: 0, seconds: 0)

        // Local contribution. bf16: q = bf16(g + e), e ← (g + e) − q (exact in fp32), contribution s·q.
        var bf16Bits: [UInt16] = []
        if format == .bf16 {
            bf16Bits = [UInt16](repeating: 0, count: length)
            // The residual is moved into a local for the loop: element access through a class property
            // costs a dynamic exclusivity check per element, on a 42.6 M-float loop. A bucket gathers its segments'.
            var e: [Float]
            if let segments, errorFeedback {
                e = []
                e.reserveCapacity(length)
                for r in segments { e.append(contentsOf: residual[r]) }
            } else {
                e = residual
                residual = []
            }
            defer {
                if let segments, errorFeedback {
                    var k = 0
                    for r in segments { for i in r { residual[i] = e[k]; k += 1 } }
                } else {
                    residual = e
                }
            }
            let feedback = errorFeedback
            for i in 0..<length {
                let t = feedback ? buffer[i] + e[i] : buffer[i]
                let q = ByteGrouping.bfloat16(t)
                bf16Bits[i] = q
                let qf = ByteGrouping.float(fromBFloat16: q)
                if feedback { e[i] = t - qf }
                buffer[i] = weight * qf
            }
        } else if samples != 1 {
            for i in 0..<length { buffer[i] = weight * buffer[i] }
        }

        if format == .none {
            try communicator.allReduceSum(&buffer)
            let moved = n > 1 ? 2 * (n - 1) * 4 * length / n : 0
            stats.bytesSent = moved
            stats.rawBytes = moved
        } else if n > 1 {
            switch resolved {
            case .ring, .auto: try ring(&buffer, stats: &stats)
            case .allGather: try gatherAll(&buffer, bf16Bits: bf16Bits, samples: samples, stats: &stats)
            }
        }
        stats.seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        return stats
    }

    // MARK: frames: [kind: 1 byte][samples: Int64 little-endian][payload]; kind 0/1 = fp32 raw/zstd, 2/3 = bf16 raw/zstd.
    // A payload zstd cannot shrink goes raw, so a frame never exceeds 9 + 4·count bytes (the receive capacity).

    private func frame(payload: [UInt8], bf16: Bool, samples: Int) throws -> [UInt8] {
        let packed = payload.isEmpty ? payload : try Zstd.compress(payload, level: zstdLevel)
        let compressed = packed.count < payload.count
        var out = [UInt8]()
        out.reserveCapacity(9 + (compressed ? packed.count : payload.count))
        out.append((bf16 ? 2 : 0) + (compressed ? 1 : 0))
        withUnsafeBytes(of: Int64(samples).littleEndian) { out.append(contentsOf: $0) }
        out.append(contentsOf: compressed ? packed : payload)
        return out
    }

    /// Decodes a frame holding `n` values → (fp32 values, sender's samples).
    private func unframe(_ bytes: [UInt8], count n: Int) throws -> (values: [Float], samples: Int) {
        guard bytes.count >= 9, bytes[0] <= 3 else {
            throw Failure(description: "gradient all-reduce: malformed frame (\(bytes.count) bytes) from a peer")
        }
        var s: Int64 = 0
        for k in 0..<8 { s |= Int64(bytes[1 + k]) << (8 * k) }
        let isBF16 = bytes[0] >= 2
        let rawSize = (isBF16 ? 2 : 4) * n
        let body = Array(bytes[9...])
        let payload = bytes[0] & 1 == 1 ? try Zstd.decompress(body, size: rawSize) : body
        guard payload.count == rawSize else {
            throw Failure(description: "gradient all-reduce: frame payload \(payload.count) bytes, expected \(rawSize)")
        }
        let values = isBF16 ? ByteGrouping.ungroupBFloat16(payload, count: n) : ByteGrouping.ungroupFloat32(payload, count: n)
        return (values, Int(s))
    }

    private func chunkRange(_ c: Int, parts: Int, of total: Int) -> Range<Int> { (c * total / parts)..<((c + 1) * total / parts) }

    private func pieces(of r: Range<Int>) -> [Range<Int>] {
        stride(from: r.lowerBound, to: r.upperBound, by: pieceElements).map { $0..<min($0 + pieceElements, r.upperBound) }
    }

    /// Ring reduce-scatter (steps 0..<n−1: send chunk (r−s) mod n right, receive chunk (r−s−1) mod n from the
    /// left and add), then ring all-gather (send chunk (r+1−s) mod n, receive (r−s) mod n; received frames are
    /// forwarded verbatim, so the final bits are made once).
    private func ring(_ buffer: inout [Float], stats: inout Stats) throws {
        let n = communicator.size, r = communicator.rank
        let right = (r + 1) % n, left = (r + n - 1) % n
        func md(_ x: Int) -> Int { ((x % n) + n) % n }

        // One exchange step: post all receives, compress-and-Isend each outgoing piece (the next piece's
        // compression overlaps the previous send), then consume the receives in order.
        func exchange(tag: Int, send: [Range<Int>], encode: (Int, Range<Int>) throws -> [UInt8],
                      receive: [Range<Int>], consume: (Int, Range<Int>, [UInt8]) throws -> Void) throws {
            let recvs = try receive.map { try communicator.ireceive(capacity: 9 + 4 * $0.count, from: left, tag: tag) }
            var sends: [any PendingSendRequest] = []
            for (j, p) in send.enumerated() {
                let f = try encode(j, p)
                stats.bytesSent += f.count
                stats.rawBytes += 4 * p.count
                sends.append(try communicator.isend(f, to: right, tag: tag))
            }
            for (j, p) in receive.enumerated() { try consume(j, p, try recvs[j].wait()) }
            for s in sends { try s.wait() }
        }

        for s in 0..<(n - 1) {
            let out = pieces(of: chunkRange(md(r - s), parts: n, of: buffer.count))
            let inc = pieces(of: chunkRange(md(r - s - 1), parts: n, of: buffer.count))
            try exchange(tag: 1, send: out, encode: { _, p in
                try frame(payload: ByteGrouping.groupFloat32(buffer[p]), bf16: false, samples: 0)
            }, receive: inc, consume: { _, p, bytes in
                let partial = try unframe(bytes, count: p.count).values
                // partial = v_c + … + v_{r−1} (ring order); this rank's term is added last.
                for (k, i) in p.enumerated() { buffer[i] = partial[k] + buffer[i] }
            })
        }
        var forward: [[UInt8]] = []
        for s in 0..<(n - 1) {
            let out = pieces(of: chunkRange(md(r + 1 - s), parts: n, of: buffer.count))
            let inc = pieces(of: chunkRange(md(r - s), parts: n, of: buffer.count))
            var received: [[UInt8]] = []
            try exchange(tag: 2, send: out, encode: { j, p in
                s == 0 ? try frame(payload: ByteGrouping.groupFloat32(buffer[p]), bf16: false, samples: 0) : forward[j]
            }, receive: inc, consume: { _, p, bytes in
                let v = try unframe(bytes, count: p.count).values
                for (k, i) in p.enumerated() { buffer[i] = v[k] }
                received.append(bytes)
            })
            forward = received
        }
    }

    /// All-gather of compressed contributions in blocks (≤ 64 Mi floats, keeping MPI counts < 2^31),
    /// summed in rank order 0, 1, …, n−1.
    private func gatherAll(_ buffer: inout [Float], bf16Bits: [UInt16], samples: Int, stats: inout Stats) throws {
        let n = communicator.size
        let block = 1 << 26
        for b in stride(from: 0, to: buffer.count, by: block) {
            let p = b..<min(b + block, buffer.count)
            let mine = format == .bf16
                ? try frame(payload: ByteGrouping.groupBFloat16(Array(bf16Bits[p])), bf16: true, samples: samples)
                : try frame(payload: ByteGrouping.groupFloat32(buffer[p]), bf16: false, samples: samples)
            stats.bytesSent += (n - 1) * mine.count  // what leaves this rank, at best, over any gather tree
            stats.rawBytes += (n - 1) * 4 * p.count
            let all = try communicator.allGather(mine)
            var acc = [Float](repeating: 0, count: p.count)
            for (q, bytes) in all.enumerated() {
                // This rank's own term is already in `buffer` (s·q for bf16, s·g for fp32): the frame is
                // lossless, so decoding it would give the same bits; skip the work.
                if q == communicator.rank {
                    if q == 0 { for (k, i) in p.enumerated() { acc[k] = buffer[i] } }
                    else { for (k, i) in p.enumerated() { acc[k] = acc[k] + buffer[i] } }
                    continue
                }
                let (vals, s) = try unframe(bytes, count: p.count)
                if format == .bf16 {
                    let w = Float(s)
                    if q == 0 { for k in 0..<p.count { acc[k] = w * vals[k] } }
                    else { for k in 0..<p.count { acc[k] = acc[k] + w * vals[k] } }
                } else {
                    if q == 0 { acc = vals } else { for k in 0..<p.count { acc[k] = acc[k] + vals[k] } }
                }
            }
            for (k, i) in p.enumerated() { buffer[i] = acc[k] }
        }
    }
}
