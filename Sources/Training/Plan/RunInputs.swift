import Dataset
import Distributed
import Foundation
import SafeTensors
import SDXL

/// A run's folders and inputs, made ready on every rank: the output and cache folders (rank 0 creates them), the
/// model file (`builtin:tiny` is generated into the cache folder), the dataset (`builtin:shapes` is drawn there, then
/// resolved). Shared by `lora-dist train` and `lora-dist cache`. Collective.
public struct RunInputs {
    public let outputDirectory: URL
    public let cacheDirectory: URL
    /// Where the latent cache lives: `<cache_dir>/latents`.
    public var latentFolder: URL { cacheDirectory.appendingPathComponent("latents") }
    public let modelPath: String
    public let dataset: DatasetConfig

    public init(config: TrainingConfig, communicator: any Communicator) throws {
        let fm = FileManager.default
        let rank = communicator.rank
        outputDirectory = URL(fileURLWithPath: config.outputDir)
        cacheDirectory = config.lora.cacheDir.map { URL(fileURLWithPath: $0) } ?? outputDirectory.appendingPathComponent("cache")
        var modelPath = config.pretrainedModelNameOrPath
        guard !modelPath.isEmpty else {
            throw TrainingError("pretrained_model_name_or_path is not set: name an SDXL checkpoint (.safetensors or a diffusers folder), or builtin:tiny")
        }
        let builtinFolder = cacheDirectory.appendingPathComponent("builtin-shapes")
        var failure: String? = nil
        if rank == 0 {
            for dir in [outputDirectory, cacheDirectory] where failure == nil {
                do { try fm.createDirectory(at: dir, withIntermediateDirectories: true) } catch {
                    failure = "\(dir.path): cannot create this folder (\(error.localizedDescription)); output_dir and [lora_dist] cache_dir must be writable"
                }
            }
        }
        // Every rank learns of rank 0's failure, so none waits for the others in a collective.
        var flag: [UInt8] = [failure == nil ? 0 : 1]
        try communicator.broadcast(&flag, root: 0)
        if flag[0] == 1 { throw TrainingError(failure ?? "rank 0 could not create output_dir / cache_dir") }
        if modelPath == "builtin:tiny" {
            // The demo's generated checkpoint (deterministic: the same file on every run).
            modelPath = cacheDirectory.appendingPathComponent("builtin-tiny.safetensors").path
            if rank == 0 && !fm.fileExists(atPath: modelPath) {
                var meta = SDXLPreset.tiny.metadata
                meta["lora_dist.seed"] = "0"
                try writeSafeTensors(SDXLPreset.tiny.randomWeights(seed: 0, dtype: .f32), metadata: meta, to: modelPath)
            }
        }
        if config.datasetSource == "builtin:shapes" && rank == 0 {
            try? fm.removeItem(at: builtinFolder)
            _ = try SyntheticShapes.write(to: builtinFolder)
        }
        try communicator.barrier()
        guard fm.fileExists(atPath: modelPath) else {
            let parts = modelPath.split(separator: "/", omittingEmptySubsequences: false)
            if parts.count == 2, !modelPath.hasPrefix("."), !modelPath.contains("\\"), !modelPath.hasSuffix(".safetensors"),
               parts.allSatisfy({ !$0.isEmpty && $0.allSatisfy { $0.isLetter || $0.isNumber || "-_.".contains($0) } }) {
                throw TrainingError("pretrained_model_name_or_path = \"\(modelPath)\" looks like a Hugging Face Hub id; lora-dist loads local files only (nothing is downloaded at run time): download the single-file checkpoint (.safetensors) or the diffusers folder first, e.g. `huggingface-cli download \(modelPath) --local-dir models/\(parts[1])`, and give its path")
            }
            throw TrainingError("pretrained_model_name_or_path: \(modelPath) does not exist (lora-dist loads local files only: a .safetensors checkpoint or a diffusers folder; `lora-dist make-model --preset sdxl --out FILE` makes a random-weight stand-in)")
        }
        self.modelPath = modelPath
        // The dataset, resolved once: at config load, or here for the built-in one.
        dataset = try config.dataset ?? config.datasetConfig(builtinFolder: builtinFolder)
    }
}
