// TrainBench: one LoRA training step of lora-dist's trainer at full size, one case per process (so peak RSS is the
// case's own). The PyTorch counterpart is bench/train/torch_train.py; bench/train/report.py runs both.
//
//   TrainBench --model FILE [--latent 64] [--batch 1] [--rank 16] [--alpha 16] [--checkpointing]
//              [--text-encoders] [--steps 3] [--warmup 1] [--threads 2] [--bf16]
//
// --text-encoders (a full checkpoint: make-model --preset sdxl without --unet-only): the text encoders' LoRA is trained
// too (kohya's default; 264 more modules on SDXL at the same rank): every step runs CLIP-L and bigG forward and
// backward on a 77-token caption per sample, on the same tape as the UNet, and their modules join the flat buffer.
// Without it, context and y are fixed random tensors (the frozen-encoder step, whose text side is memoised).
//
// A step is what `lora-dist train` does per optimizer step minus data loading and text encoding:
//   TrainingStep.run (UNet forward with kohya's LoRA on every Linear inside the transformer blocks — 722 modules
//   on SDXL — the MSE loss against the noise, backward to the LoRA weights only) into a zeroed flat gradient
//   buffer, then gradient clipping at norm 1 (kohya's default max_grad_norm) and one AdamW step (lr 1e-4) over the
//   flat parameter buffer. The UNet weights stay memory-mapped in the file's dtype (bf16 for the benchmark file)
//   and are frozen.
// Inputs: x0, noise [B, 4, L, L] and context [B, 77, ctx] and y [B, adm] ~ N(0, 1); timestep 500 for every sample;
//   noisy latents from the kohya noise schedule (x_t = √ᾱ·x0 + √(1−ᾱ)·ε).
//
// Prints JSON lines: {"side":"lora-dist","info":{…}} then one
// {"side":"lora-dist","case":…,"samples":[s…],"optimizer_samples":[s…],"peak_mb":…,"rss_loaded_mb":…,
//  "rss_end_mb":…,"load_s":…,"modules":…,"lora_params":…,"losses":[…]}.
// samples = whole step (zeroing + forward + loss + backward + clip + AdamW); optimizer_samples = clip + AdamW alone.
// peak_mb is the process's VmHWM (weights included: their file pages count once touched).
import Foundation
import SDXL
import SafeTensors
import Tensor
import Training

struct Options {
    var model = ""
    var latent = 64
    var batch = 1
    var rank = 16
    var alpha: Float = 16
    var checkpointing = false
    var bf16 = false
    var steps = 3
    var warmup = 1
    var threads = 2
    var textEncoders = false
}

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(("TrainBench: " + message + "\n").data(using: .utf8)!)
    exit(2)
}

func parseOptions() -> Options {
    var o = Options()
    var args = CommandLine.arguments.dropFirst().makeIterator()
    func value(_ name: String) -> String {
        guard let v = args.next() else { fail("\(name) needs a value") }
        return v
    }
    func int(_ name: String) -> Int {
        let v = value(name)
        guard let i = Int(v) else { fail("\(name) \(v): an integer is expected") }
        return i
    }
    while let a = args.next() {
        switch a {
        case "--model": o.model = value(a)
        case "--latent": o.latent = int(a)
        case "--batch": o.batch = int(a)
        case "--rank": o.rank = int(a)
        case "--alpha":
            let v = value(a)
            guard let f = Float(v) else { fail("--alpha \(v): a number is expected") }
            o.alpha = f
        case "--checkpointing": o.checkpointing = true
        case "--text-encoders": o.textEncoders = true
        case "--steps": o.steps = int(a)
        case "--warmup": o.warmup = int(a)
        case "--threads": o.threads = int(a)
        case "--bf16": o.bf16 = true
        default: fail("unknown argument \(a) (see the header of bench/TrainBench/main.swift)")
        }
    }
    guard !o.model.isEmpty else { fail("--model FILE is required (a UNet checkpoint: lora-dist make-model --preset sdxl --unet-only --dtype bf16 --out FILE)") }
    guard o.latent > 0, o.latent % 8 == 0 else { fail("--latent \(o.latent): a positive multiple of 8 is expected") }
    guard o.batch >= 1, o.rank >= 1 else { fail("--batch and --rank must be at least 1") }
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

func jsonList(_ v: [Double], _ format: String = "%.4f") -> String {
    "[" + v.map { String(format: format, $0) }.joined(separator: ",") + "]"
}

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

func benchMain() {
    let o = parseOptions()
    Threads.set(o.threads)
    // Before the model binds its weights: the bf16 family rounds an fp32/fp16 file's matrices once at bind.
    if o.bf16, let why = Kernels.use(.bf16) { fail(why) }
    emit([("side", jsonString("lora-dist")),
          ("info", "{\"core\":\(jsonString(BLAS.coreName)),\"threads\":\(BLAS.threads),\"family\":\(jsonString(Kernels.family.rawValue)),\"onednn\":\(jsonString(DNNL.version))}")])

    let t0 = now()
    let unet: UNet
    let network: LoRANetwork
    let optimizer: Optimizer
    let checkpoint: SDXLCheckpoint
    var encoders: (CLIPTextEncoderL, OpenCLIPTextEncoderG)? = nil
    do {
        checkpoint = try SDXLCheckpoint(path: o.model)
        unet = try checkpoint.unet()
        if o.textEncoders { encoders = try checkpoint.textEncoders() }
        network = try LoRANetwork(unet: unet, textEncoders: encoders, spec: LoRASpec(linearRank: o.rank, linearAlpha: o.alpha), seed: 1)
        optimizer = try Optimizers.make(type: "AdamW", args: [], layout: network.parameterLayout)
    } catch {
        fail("\(o.model): \(error)")
    }
    network.training = true
    let loadSeconds = now() - t0
    let rssLoaded = procStatusKB("VmRSS")

    let c = unet.config, l = o.latent, b = o.batch
    let schedule = NoiseSchedule()
    let timesteps = [Int](repeating: 500, count: b)
    let x0 = Tensor(randomNormal: [b, c.inChannels, l, l], seed: 1)        // [B, 4, L, L]
    let noise = Tensor(randomNormal: [b, c.inChannels, l, l], seed: 2)     // [B, 4, L, L]
    let noisy = schedule.addNoise(x0, noise: noise, timesteps: timesteps)   // [B, 4, L, L]
    let context = Tensor(randomNormal: [b, 77, c.contextDim], seed: 3)      // [B, 77, ctx]
    let y = Tensor(randomNormal: [b, c.admInChannels], seed: 4)             // [B, adm]
    let weights = [Float](repeating: 1, count: b)
    // With the text encoders: a 20-token caption per sample (BOS, 20 ids, EOS, padding — the tokenizers' layout).
    let caption = (0..<20).map { 320 + 37 * $0 }
    let idsL = (0..<b).map { _ in [[49406] + caption + [Int](repeating: 49407, count: 56)] }
    let idsG = (0..<b).map { _ in [[49406] + caption + [49407] + [Int](repeating: 0, count: 55)] }
    let sizes = (0..<b).map { _ in (h: 8 * l, w: 8 * l) }
    let conditioning: (Tape) -> (context: Var, y: Var) = { t in
        guard let (te1, te2) = encoders else { return (Var(context), Var(y)) }
        let (ctx, pooled) = Conditioning.encode(t, l: te1, g: te2, idsL: idsL, idsG: idsG, checkpointing: o.checkpointing)
        return (ctx, Conditioning.y(t, pooled: pooled, originalSize: sizes, cropTopLeft: sizes.map { _ in (0, 0) },
                                    targetSize: sizes, embedDim: checkpoint.sizeEmbedDim ?? 256))
    }

    var gradients = [Float](repeating: 0, count: network.parameterCount)
    let rates = [Double](repeating: 1e-4, count: network.models.count)   // one AdamW group per model, lr 1e-4
    var total: [Double] = [], optimizerTimes: [Double] = [], losses: [Double] = []
    var dnnl: [String] = []   // oneDNN's time by kind in the last step (bf16 only; DNNL.takeCounters)
    for step in 0..<(o.warmup + o.steps) {
        _ = DNNL.takeCounters()
        let s0 = now()
        for i in gradients.indices { gradients[i] = 0 }
        let loss = TrainingStep.run(unet: unet, network: network, latents: x0, noise: noise, noisyLatents: noisy,
                                    timesteps: timesteps, conditioning: conditioning, sampleWeights: weights,
                                    schedule: schedule, loss: LossOptions(), checkpointing: o.checkpointing,
                                    gradients: &gradients)
        // TrainingStep.run leaves Σ over samples; the trainer divides by the samples before the optimizer.
        let inv = 1 / Float(b)
        for i in gradients.indices { gradients[i] *= inv }
        let s1 = now()
        _ = GradientClipping.clip(&gradients, maxNorm: 1.0)
        optimizer.step(parameters: &network.parameters, gradients: gradients, learningRates: rates)
        let s2 = now()
        guard loss.loss.isFinite else { fail("step \(step): the loss is not finite (\(loss.loss))") }
        losses.append(Double(loss.loss))
        let kind = step < o.warmup ? "warm-up" : "step"
        FileHandle.standardError.write(String(format: "%@ %d: step %.2f s (of which clip + AdamW %.3f s), loss %.5f, RSS %@ MB, peak %@ MB\n",
                                              kind, step, s2 - s0, s2 - s1, loss.loss, mb(procStatusKB("VmRSS")),
                                              mb(procStatusKB("VmHWM"))).data(using: .utf8)!)
        if step >= o.warmup {
            total.append(s2 - s0)
            optimizerTimes.append(s2 - s1)
        }
        if o.bf16 {
            dnnl = DNNL.takeCounters().map {
                String(format: "{\"kind\":%@,\"seconds\":%.4f,\"flops\":%.4g,\"calls\":%d}", jsonString($0.kind),
                       $0.seconds, $0.flops, $0.calls)
            }
        }
    }
    let name = "train\(o.textEncoders ? "+te" : "")\(o.checkpointing ? "+ckpt" : "")\(o.bf16 ? "+bf16" : ""):\(l):b\(b):r\(o.rank)"
    emit([("side", jsonString("lora-dist")), ("case", jsonString(name)),
          ("samples", jsonList(total)), ("optimizer_samples", jsonList(optimizerTimes)),
          ("peak_mb", mb(procStatusKB("VmHWM"))), ("rss_loaded_mb", mb(rssLoaded)), ("rss_end_mb", mb(procStatusKB("VmRSS"))),
          ("load_s", String(format: "%.2f", loadSeconds)), ("modules", "\(network.modules.count)"),
          ("lora_params", "\(network.parameterCount)"), ("losses", jsonList(losses, "%.6g")),
          ("bf16_copies_mb", String(format: "%.0f", Double(WeightBinder.bf16CopyBytes) / 1e6)),
          ("conv_weights_mb", String(format: "%.0f", Double(DNNL.preparedWeightBytes) / 1e6)),
          ("dnnl", "[" + dnnl.joined(separator: ",") + "]")])
}

benchMain()
