// lora-dist-unet-bench: the SDXL UNet at full size, one case per process (so peak RSS is the case's own).
//
//   lora-dist-unet-bench --model sdxl_unet_bf16.safetensors --latent 64 --mode backward [--checkpointing]
//                        [--steps 3] [--warmup 1] [--threads 2]
//
// --mode forward:  UNet(x, t, context, y) with nothing requiring a gradient (inference: nothing is saved).
// --mode backward: x and context are Var(requiresGrad: true); the forward records the tape, then
//                  tape.backward(from: out, seed: g) with g ~ N(0, 1) — the gradient w.r.t. x and context
//                  of a frozen-weight UNet (the LoRA training case minus the adapters). The weights stay
//                  memory-mapped in the file's dtype (bf16 for the benchmark file) and never get gradients.
// Inputs: x, g [1, 4, L, L] and context [1, 77, 2048], y [1, 2816] ~ N(0, 1), timestep 500.
//
// Prints JSON lines: {"side":"lora-dist","info":{…}} then one
// {"side":"lora-dist","case":…,"samples":[s…],"forward_samples":[s…],"backward_samples":[s…],
//  "peak_mb":…,"rss_loaded_mb":…,"rss_end_mb":…,"load_s":…,"out_mean_abs":…,"dx_mean_abs":…,
//  "phases":[[start, forward end, backward end, is warm-up]…]} (CLOCK_MONOTONIC seconds, for the profiler).
// peak_mb is the whole process's VmHWM (weights included: their file pages count once touched).
import Foundation
import SDXL
import SafeTensors
import Tensor

struct Options {
    var model = ""
    var latent = 64
    var mode = "backward"
    var checkpointing = false
    var bf16 = false
    var steps = 3
    var warmup = 1
    var threads = 2
}

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(("lora-dist-unet-bench: " + message + "\n").data(using: .utf8)!)
    exit(2)
}

func parseOptions() -> Options {
    var o = Options()
    var args = CommandLine.arguments.dropFirst().makeIterator()
    func value(_ name: String) -> String {
        guard let v = args.next() else { fail("\(name) needs a value") }
        return v
    }
    while let a = args.next() {
        switch a {
        case "--model": o.model = value(a)
        case "--latent": o.latent = Int(value(a)) ?? 0
        case "--mode": o.mode = value(a)
        case "--checkpointing": o.checkpointing = true
        case "--bf16": o.bf16 = true
        case "--steps": o.steps = Int(value(a)) ?? 0
        case "--warmup": o.warmup = Int(value(a)) ?? 0
        case "--threads": o.threads = Int(value(a)) ?? 0
        default: fail("unknown argument \(a)")
        }
    }
    guard !o.model.isEmpty else { fail("--model FILE is required") }
    guard ["forward", "backward"].contains(o.mode) else { fail("--mode must be forward or backward") }
    guard o.latent > 0, o.latent % 4 == 0 else { fail("--latent must be a positive multiple of 4") }
    guard o.steps >= 1, o.warmup >= 0, o.threads >= 1 else { fail("--steps ≥ 1, --warmup ≥ 0, --threads ≥ 1") }
    return o
}

func emit(_ fields: [(String, String)]) {
    print("{" + fields.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",") + "}")
    fflush(stdout)
}

func jsonString(_ s: String) -> String {
    "\"" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
}

func jsonList(_ v: [Double]) -> String { "[" + v.map { String(format: "%.4f", $0) }.joined(separator: ",") + "]" }

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}

/// A field of /proc/self/status in kB (VmRSS, VmHWM), or -1.
func procStatusKB(_ key: String) -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return -1 }
    for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
        return Int(line.dropFirst(key.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" }).first ?? "") ?? -1
    }
    return -1
}

func mb(_ kb: Int) -> String { String(format: "%.0f", Double(kb) / 1024) }

/// Mean |v| (a finite, non-zero value says the random model computed something real).
func meanAbs(_ t: Tensor) -> Double {
    let s = t.scalars
    return s.reduce(0.0) { $0 + Double(abs($1)) } / Double(max(s.count, 1))
}

func benchMain() {
    let o = parseOptions()
    Threads.set(o.threads)
    // The bf16 kernel family (oneDNN), chosen before the model binds its weights.
    if o.bf16, let why = Kernels.use(.bf16) { fail(why) }
    emit([("side", jsonString("lora-dist")),
          ("info", "{\"core\":\(jsonString(BLAS.coreName)),\"threads\":\(BLAS.threads)}")])

    let t0 = now()
    let unet: UNet
    do {
        unet = try SDXLCheckpoint(path: o.model).unet()
    } catch {
        fail("\(error)")
    }
    let loadSeconds = now() - t0
    let rssLoaded = procStatusKB("VmRSS")

    let l = o.latent, c = unet.config
    let grad = o.mode == "backward"
    let x = Var(Tensor(randomNormal: [1, c.inChannels, l, l], seed: 1), requiresGrad: grad)
    let timesteps = Var(Tensor(shape: [1], [500]))
    let context = Var(Tensor(randomNormal: [1, 77, c.contextDim], seed: 2), requiresGrad: grad)
    let y = Var(Tensor(randomNormal: [1, c.admInChannels], seed: 3))
    let seed = Tensor(randomNormal: [1, c.outChannels, l, l], seed: 4)

    var total: [Double] = [], forward: [Double] = [], backward: [Double] = []
    var phases: [String] = []   // [start, forward end, backward end] of every step (CLOCK_MONOTONIC), for bench/unet_profile.py
    var outMeanAbs = 0.0, dxMeanAbs = 0.0, dcMeanAbs = 0.0
    var dnnl: [String] = []   // oneDNN's counters of the last step, forward and backward (bf16 only)
    for step in 0..<(o.warmup + o.steps) {
        _ = DNNL.takeCounters()
        let s0 = now()
        let tape = Tape()
        let out = unet(tape, x: x, timesteps: timesteps, context: context, y: y, checkpointing: o.checkpointing)
        let s1 = now()
        let forwardCounters = o.bf16 ? DNNL.takeCounters() : []
        var s2 = s1
        if grad {
            let grads = tape.backward(from: out, seed: seed)
            s2 = now()
            if step == 0 {
                guard let dx = grads[x], let dc = grads[context] else { fail("backward gave no gradient for x or context") }
                dxMeanAbs = meanAbs(dx)
                dcMeanAbs = meanAbs(dc)
            }
        }
        if step == 0 { outMeanAbs = meanAbs(out.value) }
        if o.bf16 {
            dnnl = [("forward", forwardCounters), ("backward", DNNL.takeCounters())].flatMap { phase, cs in
                cs.map { String(format: "{\"phase\":\"%@\",\"kind\":%@,\"seconds\":%.4f,\"flops\":%.4g,\"calls\":%d}",
                                phase, jsonString($0.kind), $0.seconds, $0.flops, $0.calls) }
            }
        }
        phases.append(String(format: "[%.6f,%.6f,%.6f,%@]", s0, s1, s2, step < o.warmup ? "true" : "false"))
        let kind = step < o.warmup ? "warm-up" : "step"
        FileHandle.standardError.write(String(format: "%@ %d: forward %.2f s, backward %.2f s, RSS %@ MB, peak %@ MB\n",
                                              kind, step, s1 - s0, s2 - s1, mb(procStatusKB("VmRSS")),
                                              mb(procStatusKB("VmHWM"))).data(using: .utf8)!)
        if step >= o.warmup {
            total.append(s2 - s0)
            forward.append(s1 - s0)
            backward.append(s2 - s1)
        }
    }
    let name = "\(o.mode)\(o.checkpointing ? "+ckpt" : ""):\(l)"
    emit([("side", jsonString("lora-dist")), ("case", jsonString(name)),
          ("samples", jsonList(total)), ("forward_samples", jsonList(forward)), ("backward_samples", jsonList(backward)),
          ("peak_mb", mb(procStatusKB("VmHWM"))), ("rss_loaded_mb", mb(rssLoaded)), ("rss_end_mb", mb(procStatusKB("VmRSS"))),
          ("load_s", String(format: "%.2f", loadSeconds)),
          ("out_mean_abs", String(format: "%.5g", outMeanAbs)), ("dx_mean_abs", String(format: "%.5g", dxMeanAbs)),
          ("dcontext_mean_abs", String(format: "%.5g", dcMeanAbs)),
          ("phases", "[" + phases.joined(separator: ",") + "]"), ("dnnl", "[" + dnnl.joined(separator: ",") + "]")])
}

benchMain()
