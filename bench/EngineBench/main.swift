// lora-dist-bench: times the engine's kernels for bench/report.py, which runs it side by side with
// bench/torch_bench.py and writes bench/RESULTS.md. Both programs take the same row specs and print
// one JSON object per line on stdout (see bench/README.md):
//
//   lora-dist-bench --rows 'linear:4096,640,640;conv_fwd:1,320,64,64,320,1,1' [--reps 3] [--min-time 0.3]
//   lora-dist-bench --mem --warmup-row attn:1,128,128,640,10 --rows attn:1,4096,4096,640,10
//
// Time mode: per row, warm up, then time iterations until at least `reps` samples and `min-time`
// seconds; prints {"side":"lora-dist","row":spec,"samples":[seconds...]}. --serve does the same per
// stdin line "spec reps minTime", keeping each row's tensors, so bench/report.py can alternate the
// two sides row by row.
// Memory mode: per row, one iteration in this (fresh) process; prints the growth of peak RSS over
// the RSS just before it: {"side":"lora-dist","row":spec,"peak_mb":...}.
import Foundation
import Tensor
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Command line

struct Options {
    var rows: [String] = []
    var reps = 3
    var minTime = 0.3
    var warmup = 1
    var mem = false
    var serve = false
    var warmupRow: String?
    var threads = 2
}

func parseOptions() -> Options {
    var o = Options()
    var args = CommandLine.arguments.dropFirst()
    func value(_ name: String) -> String {
        guard let v = args.popFirst() else { fail("\(name) needs a value") }
        return v
    }
    while let a = args.popFirst() {
        switch a {
        case "--rows": o.rows = value(a).split(separator: ";").map { String($0) }.filter { !$0.isEmpty }
        case "--reps": o.reps = Int(value(a)) ?? o.reps
        case "--min-time": o.minTime = Double(value(a)) ?? o.minTime
        case "--warmup": o.warmup = Int(value(a)) ?? o.warmup
        case "--threads": o.threads = Int(value(a)) ?? o.threads
        case "--mem": o.mem = true
        case "--serve": o.serve = true
        case "--warmup-row": o.warmupRow = value(a)
        case "-h", "--help":
            print("usage: lora-dist-bench --rows 'kind:args;...' [--reps N] [--min-time S] [--warmup N] [--threads N] [--mem [--warmup-row spec]]")
            print("       lora-dist-bench --serve   (reads 'spec reps minTime' lines on stdin, answers one JSON line each)")
            print("kinds: sgemm:M,N,K,transA,transB  linear:M,K,N  conv_fwd|conv_dx:N,Cin,H,W,Cout,stride,pad")
            print("       attn:B,Nq,Nk,C,heads  gn:N,C,H,W,groups  geglu:B,M,twoF")
            print("       bf16.linear:…  bf16.conv_fwd:…  bf16.conv_dx:…  (the bf16 kernel family, bf16 frozen weights)")
            exit(0)
        default: fail("unknown argument \(a)")
        }
    }
    return o
}

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(("lora-dist-bench: " + message + "\n").data(using: .utf8)!)
    exit(2)
}

// MARK: - Output

func emit(_ fields: [(String, String)]) {
    let body = fields.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",")
    print("{" + body + "}")
    fflush(stdout)
}

func jsonString(_ s: String) -> String {
    "\"" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
}

// MARK: - Clocks and memory

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}

/// A field of /proc/self/status in kB (VmRSS, VmHWM), or -1.
func procStatusKB(_ key: String) -> Int {
    guard let f = fopen("/proc/self/status", "r") else { return -1 }
    defer { fclose(f) }
    var line: UnsafeMutablePointer<CChar>?
    var cap = 0
    defer { free(line) }
    while getline(&line, &cap, f) > 0 {
        let s = String(cString: line!)
        if s.hasPrefix(key + ":") {
            return Int(s.dropFirst(key.count + 1).trimmingCharacters(in: .whitespacesAndNewlines)
                .split(separator: " ").first ?? "") ?? -1
        }
    }
    return -1
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0).
func resetPeakRSS() -> Bool {
    guard let f = fopen("/proc/self/clear_refs", "w") else { return false }
    let ok = fputs("5", f) >= 0
    return fclose(f) == 0 && ok
}

/// Keeps results alive so the optimizer cannot drop the work that made them.
nonisolated(unsafe) var sink: Float = 0
@inline(never) func consume(_ t: Tensor?) { if let t, t.count > 0 { sink += t[flat: t.count - 1] } }

// MARK: - Raw sgemm (OpenBLAS's cblas_sgemm from the library the engine loaded)

typealias CblasSgemm = @convention(c) (
    Int32, Int32, Int32, Int32, Int32, Int32, Float, UnsafePointer<Float>?, Int32,
    UnsafePointer<Float>?, Int32, Float, UnsafeMutablePointer<Float>?, Int32) -> Void

/// The engine dlopen's OpenBLAS (RTLD_GLOBAL) after choosing its kernel; this finds the same library's
/// cblas_sgemm, so "raw sgemm" runs the kernel the process actually loaded. (A static, so it is
/// initialised on first use: a global in main.swift would run, and load OpenBLAS, before benchMain.)
enum Raw {
    static let sgemm: CblasSgemm = {
        BLAS.load()
        for name in ["libopenblas.so.0", "libopenblas.so"] {
            if let h = dlopen(name, RTLD_NOW | RTLD_NOLOAD), let s = dlsym(h, "cblas_sgemm") {
                return unsafeBitCast(s, to: CblasSgemm.self)
            }
        }
        fail("cblas_sgemm not found in the loaded OpenBLAS")
    }()
}

func randomBuffer(_ n: Int, seed: UInt64) -> UnsafeMutablePointer<Float> {
    let p = UnsafeMutablePointer<Float>.allocate(capacity: n)
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    for i in 0..<n {   // xorshift: cheap, uniform in [-1, 1)
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        p[i] = Float(state >> 40) * 0x1.0p-23 - 1
    }
    return p
}

// MARK: - Rows

/// One benchmark row: `run` is one timed iteration.
struct Row {
    let run: () -> Void
}

func ints(_ spec: String, _ count: Int) -> [Int] {
    let parts = spec.split(separator: ":", maxSplits: 1)
    guard parts.count == 2 else { fail("bad row spec \(spec)") }
    let v = parts[1].split(separator: ",").compactMap { Int($0) }
    guard v.count == count else { fail("row \(spec) needs \(count) integers") }
    return v
}

func makeRow(_ spec: String) -> Row {
    // "bf16.<row>": the row in the bf16 kernel family (oneDNN), frozen weights in bf16 as training keeps them.
    if spec.hasPrefix("bf16.") {
        if let why = Kernels.bf16UnavailableReason { fail(why) }
        let inner = String(spec.dropFirst(5))
        let kind = String(inner.split(separator: ":").first ?? "")
        switch kind {
        case "linear":
            let v = ints(inner, 3)
            let x = Tensor(randomNormal: [v[0], v[1]], seed: 1)
            let w = Tensor(randomNormal: [v[2], v[1]], std: 0.05, seed: 2).converted(to: .bf16)
            return Row { Kernels.with(.bf16) { consume(Linear.forward(x, w, nil)) } }
        case "conv_fwd", "conv_dx":
            let v = ints(inner, 7)
            let (n, cin, h, wd, cout, stride, pad) = (v[0], v[1], v[2], v[3], v[4], v[5], v[6])
            let x = Tensor(randomNormal: [n, cin, h, wd], seed: 1)
            let w = Tensor(randomNormal: [cout, cin, 3, 3], std: 0.02, seed: 2).converted(to: .bf16)
            let b = Tensor(randomNormal: [cout], std: 0.1, seed: 3)
            if kind == "conv_fwd" {
                return Row { Kernels.with(.bf16) { consume(Conv2d.forward(x, w, b, stride: stride, padding: pad, frozenWeight: true)) } }
            }
            let ho = (h + 2 * pad - 3) / stride + 1, wo = (wd + 2 * pad - 3) / stride + 1
            let dY = Tensor(randomNormal: [n, cout, ho, wo], seed: 4)
            return Row {
                Kernels.with(.bf16) {
                    consume(Conv2d.backward(dY, x: x, w: w, stride: stride, padding: pad, wantX: true, wantW: false,
                                            wantB: false, frozenWeight: true).dX)
                }
            }
        default: fail("no bf16 variant of \(spec)")
        }
    }
    let kind = String(spec.split(separator: ":").first ?? "")
    switch kind {
    case "sgemm":
        // C[M,N] = op(A)·op(B), row-major, preallocated C: the library alone.
        let v = ints(spec, 5)
        let (m, n, k, ta, tb) = (v[0], v[1], v[2], v[3] != 0, v[4] != 0)
        let a = randomBuffer(m * k, seed: 1), b = randomBuffer(k * n, seed: 2)
        let c = UnsafeMutablePointer<Float>.allocate(capacity: m * n)
        c.initialize(repeating: 0, count: m * n)
        let sgemm = Raw.sgemm
        let lda = ta ? m : k, ldb = tb ? k : n
        return Row {
            sgemm(101, ta ? 112 : 111, tb ? 112 : 111, Int32(m), Int32(n), Int32(k), 1, a, Int32(lda),
                  b, Int32(ldb), 0, c, Int32(n))
            sink += c[m * n - 1]
        }
    case "linear":
        // y[M,N] = x[M,K]·wᵀ, w [N,K], no bias (as F.linear(x, w)).
        let v = ints(spec, 3)
        let x = Tensor(randomNormal: [v[0], v[1]], seed: 1)
        let w = Tensor(randomNormal: [v[2], v[1]], std: 0.05, seed: 2)
        return Row { consume(Linear.forward(x, w, nil)) }
    case "conv_fwd", "conv_dx":
        let v = ints(spec, 7)
        let (n, cin, h, wd, cout, stride, pad) = (v[0], v[1], v[2], v[3], v[4], v[5], v[6])
        let x = Tensor(randomNormal: [n, cin, h, wd], seed: 1)
        let w = Tensor(randomNormal: [cout, cin, 3, 3], std: 0.02, seed: 2)
        let b = Tensor(randomNormal: [cout], std: 0.1, seed: 3)
        if kind == "conv_fwd" {
            return Row { consume(Conv2d.forward(x, w, b, stride: stride, padding: pad)) }
        }
        let ho = (h + 2 * pad - 3) / stride + 1, wo = (wd + 2 * pad - 3) / stride + 1
        let dY = Tensor(randomNormal: [n, cout, ho, wo], seed: 4)
        // The LoRA case: frozen conv weight, so only the input gradient.
        return Row {
            consume(Conv2d.backward(dY, x: x, w: w, stride: stride, padding: pad,
                                    wantX: true, wantW: false, wantB: false).dX)
        }
    case "attn":
        let v = ints(spec, 5)
        let (b, nq, nk, c, heads) = (v[0], v[1], v[2], v[3], v[4])
        let q = Tensor(randomNormal: [b, nq, c], seed: 1)
        let k = Tensor(randomNormal: [b, nk, c], seed: 2)
        let vv = Tensor(randomNormal: [b, nk, c], seed: 3)
        let dO = Tensor(randomNormal: [b, nq, c], seed: 4)
        return Row {
            let f = Attention.forward(q: q, k: k, v: vv, heads: heads)
            let g = Attention.backward(dOut: dO, q: q, k: k, v: vv, out: f.out, logsumexp: f.logsumexp,
                                       heads: heads, wantQ: true, wantK: true, wantV: true)
            consume(g.dQ); consume(g.dK); consume(g.dV)
        }
    case "gn":
        let v = ints(spec, 5)
        let (n, c, h, wd, groups) = (v[0], v[1], v[2], v[3], v[4])
        let x = Tensor(randomNormal: [n, c, h, wd], seed: 1)
        let w = Tensor(randomNormal: [c], std: 0.1, seed: 2)
        let b = Tensor(randomNormal: [c], std: 0.1, seed: 3)
        let dY = Tensor(randomNormal: [n, c, h, wd], seed: 4)
        return Row {
            let f = GroupNorm.forward(x, groups: groups, weight: w, bias: b, eps: 1e-5)
            consume(f.y)
            let g = GroupNorm.backward(dY, x: x, mean: f.mean, rstd: f.rstd, groups: groups, weight: w,
                                       wantX: true, wantWeight: true, wantBias: true)
            consume(g.dX); consume(g.dWeight); consume(g.dBias)
        }
    case "geglu":
        let v = ints(spec, 3)
        let (b, m, two) = (v[0], v[1], v[2])
        let x = Tensor(randomNormal: [b, m, two], seed: 1)
        let dY = Tensor(randomNormal: [b, m, two / 2], seed: 2)
        return Row {
            consume(Activation.gegluForward(x))
            consume(Activation.gegluBackward(dY, x: x))
        }
    default:
        fail("unknown row kind in \(spec)")
    }
}

// MARK: - Timing

/// Warm-up (`warmup` iterations, then more while a short row has had under 0.1 s), then samples
/// until there are at least `reps` of them and `minTime` seconds have passed (at most 200).
func measure(_ row: Row, reps: Int, minTime: Double, warmup: Int) -> [Double] {
    var t0 = now()
    for _ in 0..<warmup { row.run() }
    if warmup > 0 {
        while now() - t0 < 0.1 {
            let s = now(); row.run()
            if now() - s > 0.05 { break }
        }
    }
    var samples: [Double] = []
    t0 = now()
    while samples.count < reps || (now() - t0 < minTime && samples.count < 200) {
        let s = now()
        row.run()
        samples.append(now() - s)
    }
    return samples
}

func emitSamples(_ spec: String, _ samples: [Double]) {
    emit([("side", jsonString("lora-dist")), ("row", jsonString(spec)),
          ("samples", "[" + samples.map { String(format: "%.7f", $0) }.joined(separator: ",") + "]")])
}

// MARK: - Main

func benchMain() {
    let options = parseOptions()
    // Read before the engine loads OpenBLAS (it replaces OPENBLAS_CORETYPE; LORA_DIST_BLAS_CORE overrides it).
    let environment = ProcessInfo.processInfo.environment
    let inheritedCoreType = environment["OPENBLAS_CORETYPE"] ?? "", overrideCore = environment["LORA_DIST_BLAS_CORE"] ?? ""
    Threads.set(options.threads)
    emit([("side", jsonString("lora-dist")),
          ("info", "{\"core\":\(jsonString(BLAS.coreName)),\"threads\":\(BLAS.threads),"
                   + "\"inherited_coretype\":\(jsonString(inheritedCoreType)),\"override\":\(jsonString(overrideCore))}")])

    if options.mem {
        if let spec = options.warmupRow { makeRow(spec).run() }   // thread pools up before the baseline
        for spec in options.rows {
            let row = makeRow(spec)
            let base = procStatusKB("VmRSS")
            guard resetPeakRSS() else { fail("cannot write /proc/self/clear_refs") }
            row.run()
            let peak = procStatusKB("VmHWM")
            emit([("side", jsonString("lora-dist")), ("row", jsonString(spec)),
                  ("peak_mb", String(format: "%.1f", Double(peak - base) / 1024))])
        }
    } else if options.serve {
        // One command per stdin line, "spec reps minTime"; rows are built once and kept.
        var cache: [String: Row] = [:]
        var last: [String: Double] = [:]
        while let line = readLine() {
            let parts = line.split(separator: " ").map(String.init)
            if parts.isEmpty { continue }
            if parts[0] == "quit" { break }
            let spec = parts[0]
            let reps = parts.count > 1 ? Int(parts[1]) ?? options.reps : options.reps
            let minTime = parts.count > 2 ? Double(parts[2]) ?? options.minTime : options.minTime
            let first = cache[spec] == nil
            let row = cache[spec] ?? makeRow(spec)
            cache[spec] = row
            let samples = measure(row, reps: reps, minTime: minTime,
                                  warmup: first ? max(options.warmup, 1) : ((last[spec] ?? 0) < 0.3 ? 1 : 0))
            last[spec] = samples.last
            emitSamples(spec, samples)
        }
    } else {
        for spec in options.rows {
            emitSamples(spec, measure(makeRow(spec), reps: options.reps, minTime: options.minTime,
                                      warmup: max(options.warmup, 1)))
        }
    }
    if sink.isNaN { FileHandle.standardError.write("nan in results\n".data(using: .utf8)!) }
}

benchMain()
