// Data-pipeline stage timings, the Swift side of bench/data/torch_vae.py: ImageIO.load (libvips decode +
// Lanczos resize + centre crop, per image) and VAE.encode on [1, 3, R, R] with random fp32 weights, the
// `tiny` or `sdxl` VAE config. One JSON line on stdout. `bf16`: the bf16 kernel family (oneDNN), chosen before the
// weights bind so the VAE's matrices are rounded to bf16 once, as `lora-dist cache` does under mixed_precision bf16.
// Usage: lora-dist-data-bench <image-folder> <resolution> <tiny|sdxl> <repeats> [threads] [fp32|bf16]
import Dataset
import Foundation
import SDXL
import SafeTensors
import Tensor

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}

let a = CommandLine.arguments
guard a.count >= 5, let res = Int(a[2]), let reps = Int(a[4]), let preset = SDXLPreset.named(a[3]) else {
    FileHandle.standardError.write("usage: DataBench <folder> <resolution> <tiny|sdxl> <repeats> [threads]\n".data(using: .utf8)!)
    exit(2)
}
Threads.set(a.count > 5 ? Int(a[5])! : 2)
let family: KernelFamily = a.count > 6 && a[6] == "bf16" ? .bf16 : .fp32
if family == .bf16, let why = DNNL.unavailableReason {
    FileHandle.standardError.write("bf16 asked for, but \(why)\n".data(using: .utf8)!)
    exit(1)
}
Kernels.use(family)
let files = try FileManager.default.contentsOfDirectory(atPath: a[1]).filter { $0.hasSuffix(".png") }.sorted()
    .map { a[1] + "/" + $0 }

// Same geometry as torch_vae.py: scale so the short side is R, centre-crop R×R.
func decode(_ path: String) throws -> Tensor {
    let (w, h) = try ImageIO.size(of: path)
    let s = Double(res) / Double(min(w, h))
    let rw = max(res, Int((Double(w) * s).rounded())), rh = max(res, Int((Double(h) * s).rounded()))
    let img = try ImageIO.load(path, resizeTo: (rw, rh), crop: ((rw - res) / 2, (rh - res) / 2, res, res))
    return Tensor(shape: [1, 3, img.height, img.width], img.chwFloats())
}

let binder = WeightBinder(RandomWeights(seed: 0, dtype: .f32))
let vae = VAE(binder.scope(SDXLCheckpoint.vaePrefix), config: preset.vae)
_ = vae.encode(Tape(recording: false), Var(Tensor(shape: [1, 3, 64, 64], [Float](repeating: 0, count: 3 * 64 * 64))))

func median(_ v: [Double]) -> Double { let s = v.sorted(); return s[s.count / 2] }
var dec: [Double] = [], enc: [Double] = []
for _ in 0..<reps {
    var t0 = now()
    let xs = try files.map(decode)
    dec.append((now() - t0) / Double(files.count))
    t0 = now()
    let (mean, _) = vae.encode(Tape(recording: false), Var(xs[0]))
    precondition(mean.value.shape == [1, 4, res / 8, res / 8], "latent shape \(mean.value.shape)")
    enc.append(now() - t0)
}
let d = median(dec), e = median(enc)
print("{\"impl\":\"lora-dist-stages\",\"preset\":\"\(preset.name)\",\"precision\":\"\(family)\",\"res\":\(res),\"decode_s\":\(d),\"encode_s\":\(e),\"images_per_s\":\(1 / (d + e)),\"threads\":\(BLAS.threads)}")
