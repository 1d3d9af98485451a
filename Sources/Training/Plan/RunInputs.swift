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
    /// Rank 0's hold on output_dir (`lockOutput`): one run per folder.
    let outputLock: OutputLock?

    /// `lockOutput`: take output_dir for this run (train; `lora-dist cache` only fills the cache).
    public init(config: TrainingConfig, communicator: any Communicator, lockOutput: Bool = false) throws {
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
        var lock: OutputLock? = nil
        if rank == 0 {
            let folders = [(outputDirectory, "output_dir"),
                           (cacheDirectory, config.lora.cacheDir == nil ? "output_dir (its cache folder)" : "[lora_dist] cache_dir")]
            for (dir, key) in folders where failure == nil {
                do { try fm.createDirectory(at: dir, withIntermediateDirectories: true) } catch {
                    failure = "\(key) \(dir.path): cannot create this folder (\(Self.reason(error, dir))); give a folder this user can write"
                }
            }
            if failure == nil && lockOutput {
                do { lock = try OutputLock(outputDirectory: outputDirectory) } catch { failure = "\(error)" }
            }
        }
        outputLock = lock
        // Every rank learns of rank 0's failure, so none waits for the others in a collective.
        var flag: [UInt8] = [failure == nil ? 0 : 1]
        try communicator.broadcast(&flag, root: 0)
        if flag[0] == 1 { throw TrainingError(failure ?? "rank 0 could not create or lock output_dir / cache_dir (its message is above)") }
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

    /// The OS's reason for a failed folder creation ("Permission denied", "Not a directory", "Read-only file
    /// system"), not Foundation's "The operation could not be completed (NSCocoaErrorDomain …)".
    static func reason(_ error: Error, _ dir: URL) -> String {
        let ns = error as NSError
        if let u = ns.userInfo[NSUnderlyingErrorKey] as? NSError, u.domain == NSPOSIXErrorDomain {
            return String(cString: strerror(Int32(u.code)))
        }
        // Find the first existing ancestor: a file where a folder is needed, or one without write permission.
        var p = dir
        while p.path != "/" && !FileManager.default.fileExists(atPath: p.path) { p.deleteLastPathComponent() }
        var isDir: ObjCBool = false
        if FileManager.default.fileExists(atPath: p.path, isDirectory: &isDir), !isDir.boolValue {
            return "\(p.path) is a file, not a folder"
        }
        if !FileManager.default.isWritableFile(atPath: p.path) { return "\(p.path) is not writable" }
        return ns.localizedDescription
    }
}
