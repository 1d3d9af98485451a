// Test-support executable for the multi-rank all-reduce tests and benchmark, launched by
// `mpirun -np N --oversubscribe MPIHarness <mode>` (Tests/DistributedTests/AllReduceTests.swift, bench/allreduce).
//   check            every wire format × algorithm × size × sample pattern; exits 1 on the first failed check
//   bench --floats N --reps R [--level L]   timing rows as JSON lines on rank 0
import Base
import Distributed
import Foundation

// MARK: deterministic data (every rank can regenerate every other rank's gradient for the reference)

/// LoRA-like gradient stand-in: gaussian, with a per-block (4096 floats ≈ one small tensor) standard deviation
/// drawn log-uniformly from 1e-5...1e-2, so exponents spread the way different layers' gradients do.
func gradient(rank: Int, step: Int, count: Int, blockSize: Int = 4096) -> [Float] {
    var rng = SplitMix64(seed: UInt64(rank) &* 1_000_003 &+ UInt64(step) &* 7919 &+ 12345)
    var out = [Float](repeating: 0, count: count)
    var sigma = 1e-3
    for i in 0..<count {
        if i % blockSize == 0 { sigma = pow(10, -5 + 3 * rng.uniform()) }
        out[i] = Float(rng.normal() * sigma)
    }
    return out
}

func fail(_ message: String, _ rank: Int) -> Never {
    FileHandle.standardError.write("FAIL (rank \(rank)): \(message)\n".data(using: .utf8)!)
    exit(1)
}


func chunkRange(_ c: Int, parts: Int, count: Int) -> Range<Int> { (c * count / parts)..<((c + 1) * count / parts) }

/// The reference: contributions Float(s_q)·x_q summed in the algorithm's fixed order, divided by Float(S).
/// Ring: chunk c (of `size` equal-ish chunks) in order c, c+1, …; all-gather: ranks 0, 1, ….
func reference(contributions: [[Float]], total: Int, ring: Bool) -> [Float] {
    let n = contributions.count, count = contributions[0].count
    var out = [Float](repeating: 0, count: count)
    for c in 0..<n {
        for i in chunkRange(c, parts: n, count: count) {
            let order = ring ? (0..<n).map { ($0 + c) % n } : Array(0..<n)
            var acc = contributions[order[0]][i]
            for q in order.dropFirst() { acc = acc + contributions[q][i] }
            out[i] = acc / Float(total)
        }
    }
    return out
}

func bf16Round(_ x: Float) -> Float { ByteGrouping.float(fromBFloat16: ByteGrouping.bfloat16(x)) }

func checkIdenticalOnAllRanks(_ comm: MPICommunicator, _ result: [Float], _ what: String) throws {
    var h = FNV1a64.hash(result)
    let mine = withUnsafeBytes(of: &h) { Array($0) }
    let all = try comm.allGather(mine)
    if Set(all).count != 1 { fail("\(what): ranks hold different results (hashes differ)", comm.rank) }
}

func runChecks(_ comm: MPICommunicator) throws {
    let n = comm.size, r = comm.rank
    var checks = 0
    let samplePatterns: [[Int]] = [(0..<n).map { $0 + 1 }, (0..<n).map { [3, 0, 1][$0 % 3] }]
    let algorithms: [GradientAllReduce.Algorithm] = [.ring, .allGather, .auto]
    for format in WireFormat.allCases {
        for algorithm in algorithms {
            for count in [0, 1, 2, 5, 7, 1000, 10007] {
                for pattern in samplePatterns {
                    let piece = count <= 7 ? 2 : 97
                    let reducer = try GradientAllReduce(communicator: comm, count: count, format: format,
                                                        algorithm: algorithm, pieceElements: piece)
                    let what = "\(format)/\(algorithm)/count \(count)/samples \(pattern)"
                    let grads = (0..<n).map { gradient(rank: $0, step: count, count: count) }
                    var buffer = grads[r]
                    let stats = try reducer.average(&buffer, samples: pattern[r])
                    let total = pattern.reduce(0, +)
                    try checkIdenticalOnAllRanks(comm, buffer, what)
                    // Exact weighted average in double: checks the weighting itself.
                    var magnitude = 0.0
                    for i in 0..<count {
                        var exact = 0.0, mag = 0.0
                        for q in 0..<n { exact += Double(pattern[q]) * Double(grads[q][i]); mag += Double(pattern[q]) * abs(Double(grads[q][i])) }
                        exact /= Double(total); mag /= Double(total)
                        magnitude = max(magnitude, mag)
                        let tol = format == .bf16 ? 1e-2 * mag : 1e-5 * mag
                        if abs(Double(buffer[i]) - exact) > tol + 1e-30 {
                            fail("\(what): element \(i) = \(buffer[i]), weighted average \(exact) (tolerance \(tol))", r)
                        }
                    }
                    if format != .none {
                        let resolved = algorithm.resolved(format: format, worldSize: n)
                        let contributions = (0..<n).map { q in grads[q].map { Float(pattern[q]) * (format == .bf16 ? bf16Round($0) : $0) } }
                        let ref = count == 0 ? [] : reference(contributions: contributions, total: total, ring: resolved == .ring)
                        if ref.map(\.bitPattern) != buffer.map(\.bitPattern) {
                            let i = (0..<count).first { ref[$0].bitPattern != buffer[$0].bitPattern }!
                            fail("\(what): not bit-equal to the fixed-order sum at \(i): \(buffer[i]) vs \(ref[i])", r)
                        }
                        // Ring pieces here are 97 floats (388 bytes, 9 of header): too small to judge; all-gather frames are whole.
                        // Gaussian mantissas are incompressible: only the exponent byte shrinks (fp32 ≈ 1.05-1.1×; bf16 ≥ 2× + that).
                        let floor = format == .fp32 ? 1.03 : 2.1
                        if n > 1 && count == 10007 && resolved == .allGather && stats.compressionRatio <= floor {
                            fail("\(what): compression ratio \(stats.compressionRatio) on gaussian data, expected > \(floor)", r)
                        }
                    }
                    checks += 1
                }
            }
        }
    }

    // bf16 error feedback: gradients 1.001 ± 1e-4 round to bf16 1.0 every step (spacing 2^-7 at 1), a
    // systematic −0.001. With feedback the running sum of averages stays within one rounding of the exact
    // running sum; without, the error grows by ~0.001 per step.
    for algorithm in [GradientAllReduce.Algorithm.ring, .allGather] {
        var worst: [Bool: Double] = [:]
        for feedback in [true, false] {
            let count = 257, steps = 100
            let reducer = try GradientAllReduce(communicator: comm, count: count, format: .bf16, algorithm: algorithm,
                                                pieceElements: 50, errorFeedback: feedback)
            var running = [Double](repeating: 0, count: count), exactRunning = running
            let weights = (0..<n).map { $0 + 2 }
            for t in 0..<steps {
                let grads = (0..<n).map { q in gradient(rank: q, step: 1000 + t, count: count).map { 1.001 + $0 * 10 } }
                var buffer = grads[r]
                _ = try reducer.average(&buffer, samples: weights[r])
                for i in 0..<count {
                    running[i] += Double(buffer[i])
                    exactRunning[i] += (0..<n).map { Double(weights[$0]) * Double(grads[$0][i]) }.reduce(0, +)
                        / Double(weights.reduce(0, +))
                }
                try checkIdenticalOnAllRanks(comm, buffer, "bf16 feedback \(feedback) step \(t)")
            }
            worst[feedback] = zip(running, exactRunning).map { abs($0 - $1) }.max()!
        }
        if worst[true]! > 0.01 { fail("bf16/\(algorithm): with error feedback the running sum is off by \(worst[true]!) after 100 steps (bound 0.01)", r) }
        if worst[false]! < 0.05 { fail("bf16/\(algorithm): without feedback the error \(worst[false]!) should have grown past 0.05", r) }
        if r == 0 { print("bf16/\(algorithm) 100-step running-sum error: feedback \(worst[true]!), none \(worst[false]!)") }
        checks += 1
    }

    // Bad input, collectively: no samples anywhere; ranks disagreeing on the size.
    let reducer = try GradientAllReduce(communicator: comm, count: 4, format: .fp32)
    var zeros: [Float] = [1, 2, 3, 4]
    do { _ = try reducer.average(&zeros, samples: 0); fail("total samples 0 should throw", r) }
    catch let e as GradientAllReduce.Failure where e.description.contains("total 0") { checks += 1 }
    if n > 1 {
        do { _ = try GradientAllReduce(communicator: comm, count: 10 + r, format: .fp32); fail("size mismatch should throw", r) }
        catch let e as GradientAllReduce.Failure where e.description.contains("disagree") { checks += 1 }
    }
    if r == 0 { print("OK np=\(n) checks=\(checks)") }
}

// MARK: benchmark

func median(_ xs: [Double]) -> Double { let s = xs.sorted(); return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2 }

/// `gradients`: a folder of real gradients (`lora-dist train` with LORA_DIST_BENCH_DUMP_GRADIENTS): rank r reduces
/// rank<r mod n>-step<step>.f32 of the n ranks dumped there instead of the synthetic data; `floats` is then its size.
func runBench(_ comm: MPICommunicator, floats: Int, reps: Int, level: Int32, gradients: String?, step: Int) throws {
    var grads: [Float]
    if let gradients {
        let files = try FileManager.default.contentsOfDirectory(atPath: gradients).filter { $0.hasSuffix("-step\(step).f32") }
        guard !files.isEmpty else { fail("no rank*-step\(step).f32 in \(gradients)", comm.rank) }
        let data = try Data(contentsOf: URL(fileURLWithPath: gradients).appendingPathComponent("rank\(comm.rank % files.count)-step\(step).f32"))
        grads = [Float](repeating: 0, count: data.count / 4)
        _ = grads.withUnsafeMutableBytes { data.copyBytes(to: $0) }
    } else {
        grads = gradient(rank: comm.rank, step: 0, count: floats, blockSize: 65536)
    }
    let floats = grads.count
    let cases: [(WireFormat, GradientAllReduce.Algorithm)] = [(.none, .ring), (.fp32, .ring), (.fp32, .allGather), (.bf16, .ring), (.bf16, .allGather)]
    let reducers = try cases.map { try GradientAllReduce(communicator: comm, count: floats, format: $0.0, zstdLevel: level, algorithm: $0.1) }
    var times = [[Double]](repeating: [], count: cases.count)
    var stats = [GradientAllReduce.Stats?](repeating: nil, count: cases.count)
    for _ in 0..<reps {
        for (k, reducer) in reducers.enumerated() {  // interleaved: load drift hits every case alike
            var buffer = grads
            try comm.barrier()
            let st = try reducer.average(&buffer, samples: 4)
            let slowest = try comm.allReduce([Int64(st.seconds * 1e9)], op: .max)[0]
            times[k].append(Double(slowest) / 1e9)
            stats[k] = st
        }
    }
    if comm.rank == 0 {
        for (k, c) in cases.enumerated() {
            let s = stats[k]!, m = median(times[k])
            let algo = c.0 == .none ? "MPI_Allreduce" : c.1.rawValue
            print("{\"np\": \(comm.size), \"floats\": \(floats), \"data\": \"\(gradients == nil ? "synthetic" : "real step \(step)")\", \"format\": \"\(c.0.rawValue)\", \"algorithm\": \"\(algo)\", \"level\": \(level), \"reps\": \(reps), \"median_s\": \(m), \"min_s\": \(times[k].min()!), \"ratio\": \(s.compressionRatio), \"bytes_sent\": \(s.bytesSent), \"algbw_GBps\": \(Double(4 * floats) / m / 1e9)}")
        }
    }
}

/// ParameterSync: rank 0's values reach every rank; identical values pass the divergence check; one rank
/// off by one ulp makes every rank throw, naming that rank.
func runSyncChecks(_ comm: MPICommunicator) throws {
    let sync = ParameterSync(communicator: comm, every: 5)
    var values = (0..<1001).map { Float($0 * (comm.rank + 1)) * 0.37 }
    try sync.broadcastFromRankZero(&values)
    let expected = (0..<1001).map { Float($0) * 0.37 }
    guard values.map(\.bitPattern) == expected.map(\.bitPattern) else { fail("broadcast did not deliver rank 0's values", comm.rank) }
    try sync.check(values, step: 5)
    try sync.check([Float.nan], step: 7)                 // not a check step: no collective, no error
    if comm.size > 1 {
        var off = values
        if comm.rank == comm.size - 1 { off[500] = off[500].nextUp }
        do {
            try sync.check(off, step: 10)
            fail("divergence not detected", comm.rank)
        } catch let e as ParameterSync.Diverged {
            guard "\(e)".contains("rank(s) \(comm.size - 1) ") else { fail("wrong rank named: \(e)", comm.rank) }
        }
    }
    print("SYNC OK np=\(comm.size) rank=\(comm.rank)")
}

/// Waiting (issue 13): (1) a rank waiting 3 s in a barrier for a late rank uses little CPU (no busy-spin);
/// (2) with rank `size − 1` stopped (SIGSTOP), every other rank's collective ends after `timeout` with an error naming
/// it; (3) the same inside the compressed ring's point-to-point exchange, where the pending sends and receives left
/// behind by the error must not block (they did: a dropped receive waited in deinit, so the rank hung past its
/// timeout). Rank 0 prints the measurements; a stopped rank never prints (mpirun kills it after the others exit).
func runWaitChecks(_ comm: MPICommunicator) throws {
    func cpuSeconds() -> Double {
        var u = rusage()
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &u)
        return Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6
    }
    comm.timeout = 60
    try comm.barrier()
    let last = comm.size - 1
    let (cpu0, wall0) = (cpuSeconds(), Date())
    if comm.rank == last { Thread.sleep(forTimeInterval: 3) }
    try comm.barrier()
    let (cpu, wall) = (cpuSeconds() - cpu0, Date().timeIntervalSince(wall0))
    if comm.rank == 0 { print(String(format: "WAIT cpu %.3f s over %.2f s", cpu, wall)) }
    if comm.rank == 0 && (wall < 2.5 || cpu > 0.5 * wall) { fail(String(format: "waiting used %.2f s of CPU in %.2f s", cpu, wall), comm.rank) }

    // Built before the stop: the constructor is itself a collective. 3 M floats: messages far above the eager limit.
    // Four pieces per chunk: receives posted and never waited for are left behind when the first one times out.
    let ring = try GradientAllReduce(communicator: comm, count: 3 << 20, format: .fp32, algorithm: .ring, pieceElements: 1 << 18)
    comm.timeout = 2
    comm.waitingFor = "the harness's stall check"
    if comm.rank == last { raise(SIGSTOP) }
    var flag: [Float] = [1]
    do {
        try comm.allReduceSum(&flag)
        fail("the all-reduce with a stopped rank returned", comm.rank)
    } catch {
        let text = "\(error)"
        guard text.contains("Rank(s) \(last) did not answer"), text.contains("the harness's stall check") else {
            fail("wrong timeout message: \(text)", comm.rank)
        }
        if comm.rank == 0 { print("TIMEOUT \(text)") }
    }
    comm.waitingFor = "the harness's ring stall check"
    var gradient = (0..<(3 << 20)).map { Float(sin(Double($0 &* (comm.rank + 1)))) }
    let ringStart = Date()
    do {
        _ = try ring.sum(&gradient)
        fail("the ring all-reduce with a stopped rank returned", comm.rank)
    } catch {
        let text = "\(error)"
        guard text.contains("Rank(s) \(last) did not answer"), text.contains("ring stall check") else {
            fail("wrong ring timeout message: \(text)", comm.rank)
        }
        if comm.rank == 0 { print(String(format: "RING TIMEOUT after %.1f s: %@", Date().timeIntervalSince(ringStart), text)) }
    }
    // Every live rank got out of the ring: ranks 1…last−1 report to rank 0.
    comm.timeout = 30
    if comm.rank != 0 {
        try comm.isend([1], to: 0, tag: 77).wait()
    } else {
        for r in 1..<last { _ = try comm.ireceive(capacity: 1, from: r, tag: 77).wait() }
        print("RING OK: ranks 0…\(last - 1) returned from the stalled exchange")
    }
    // A stopped rank never reaches MPI_Finalize: end the job the way lora-dist train does after such an error.
    if comm.rank == 0 {
        print("WAIT OK np=\(comm.size)")
        fflush(stdout)
        comm.abort(code: 0)
    }
    while true { sleep(1) }   // until mpirun ends this rank
}

let args = CommandLine.arguments
Memory.keepFreedBlocks()   // as lora-dist does (EngineOptions.apply): the bench measures what training runs
let comm = try MPICommunicator()
func option(_ name: String, _ fallback: Int) -> Int {
    if let i = args.firstIndex(of: name), i + 1 < args.count, let v = Int(args[i + 1]) { return v }
    return fallback
}
do {
    switch args.count > 1 ? args[1] : "" {
    case "check": try runChecks(comm)
    case "sync": try runSyncChecks(comm)
    case "wait": try runWaitChecks(comm)
    case "bench":
        let dir = args.firstIndex(of: "--gradients").flatMap { $0 + 1 < args.count ? args[$0 + 1] : nil }
        try runBench(comm, floats: option("--floats", 1 << 20), reps: option("--reps", 3), level: Int32(option("--level", 1)),
                     gradients: dir, step: option("--step", 1))
    default:
        FileHandle.standardError.write("usage: MPIHarness check | sync | bench --floats N --reps R [--level L]\n".data(using: .utf8)!)
        exit(2)
    }
} catch {
    fail("\(error)", comm.rank)
}
try comm.finalize()
