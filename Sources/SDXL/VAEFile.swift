import Foundation
import SafeTensors
import Tensor

/// An SDXL VAE from its own file — kohya's `--vae`: the fp16-fix VAE, `sdxl_vae.safetensors` — in any of the layouts
/// such files come in, presented under the canonical keys (`first_stage_model.*`):
///   - the single-file (LDM) layout, with or without the `first_stage_model.` prefix (`encoder.down.0.block.0…`);
///   - diffusers' AutoencoderKL names (`encoder.down_blocks.0.resnets.0…`), mapped by the diffusers table;
///   - a diffusers `vae/` folder (config.json + diffusion_pytorch_model[.fp16].safetensors), whose scaling_factor
///     the config gives.
public final class VAEFile: WeightSource {
    public let path: String
    public let sourceName: String
    /// Canonical key → its shape.
    public let shapes: [String: [Int]]
    /// config.json's scaling_factor (a diffusers folder), if any.
    public let scalingFactor: Float?
    private let file: SafeTensorsFile
    private let origins: [String: (key: String, transform: DiffusersTransform)]

    public var keys: [String] { shapes.keys.sorted() }

    public init(path: String) throws {
        self.path = path
        var weights = path
        var scaling: Float? = nil
        if DiffusersFolder.isFolder(path) {
            let root = URL(fileURLWithPath: path)
            let candidates = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]
            guard let name = candidates.first(where: { FileManager.default.fileExists(atPath: root.appendingPathComponent($0).path) }) else {
                throw DiffusersFolderError(description: "\(path): a VAE folder holds diffusion_pytorch_model.safetensors (or .fp16.safetensors); none found")
            }
            weights = root.appendingPathComponent(name).path
            scaling = (DiffusersFolder.json(root.appendingPathComponent("config.json"))?["scaling_factor"] as? NSNumber)?.floatValue
        }
        file = try SafeTensorsFile(path: weights)
        sourceName = weights
        scalingFactor = scaling
        let prefix = SDXLCheckpoint.vaePrefix + "."
        let names = file.names
        var origins: [String: (key: String, transform: DiffusersTransform)] = [:]
        if names.contains(where: { $0.hasPrefix(prefix) }) {
            // A whole checkpoint, or a VAE saved with its single-file prefix: only the VAE's keys.
            for n in names where n.hasPrefix(prefix) { origins[n] = (n, .rename) }
        } else if names.contains(where: { $0.hasPrefix("encoder.down_blocks.") || $0.hasPrefix("decoder.up_blocks.") }) {
            let shape = DiffusersLayout.Shape(keys: [.vae: names])
            for n in names {
                guard let (ckey, transform) = DiffusersLayout.canonicalKey(for: n, in: .vae, shape: shape) else {
                    throw DiffusersFolderError(description: "\(weights): \(n) is no tensor of diffusers' AutoencoderKL (is this an SDXL VAE?)")
                }
                origins[ckey] = (n, transform)
            }
        } else {
            for n in names { origins[prefix + n] = (n, .rename) }
        }
        guard !origins.isEmpty else { throw DiffusersFolderError(description: "\(weights): holds no tensors") }
        self.origins = origins
        var shapes: [String: [Int]] = [:]
        for (ckey, o) in origins {
            let s = file.entries[o.key]!.shape
            shapes[ckey] = o.transform == .linearToConv1x1 && s.count == 2 ? s + [1, 1] : s
        }
        self.shapes = shapes
    }

    public func tensor(_ key: String, expectedShape: [Int]) throws -> Tensor? {
        guard let o = origins[key] else { return nil }
        let t = try file.tensor(o.key)
        return o.transform == .linearToConv1x1 && t.rank == 2 ? t.reshaped(t.shape + [1, 1]) : t
    }

    /// The VAE, strictly: every key of the file is a VAE weight and every VAE weight is in the file.
    public func vae() throws -> VAE {
        var config = try VAEConfig.infer(shapes: shapes)
        if let scalingFactor { config.scalingFactor = scalingFactor }
        let binder = WeightBinder(self)
        let model = VAE(binder.scope(SDXLCheckpoint.vaePrefix), config: config)
        try binder.finish(checkingUnusedUnder: [SDXLCheckpoint.vaePrefix + "."])
        return model
    }
}
