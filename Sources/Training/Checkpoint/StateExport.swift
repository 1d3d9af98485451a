import Distributed
import Foundation
import SafeTensors
import Tensor

/// `lora-dist export`: the LoRA file of a resumable state, without the model or the config — a stopped or requeued
/// run always yields something to try in ComfyUI or A1111. The state's `lora.layout` blob says where each tensor
/// lives in its parameter buffer and carries the metadata a step save of that step would have had.
public enum StateExport {
    public struct Result: Sendable {
        public let path: String
        public let step: Int
        public let state: String
    }

    /// `state`: a state file, or a state folder (its newest readable state). `output`: the LoRA file (default: next to
    /// the state folder, `<output_name>-state-step<N>.safetensors`). `precision`: fp16, bf16 or fp32 (default: the
    /// run's save_precision).
    public static func export(state: String, to output: String?, precision: String?) throws -> Result {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: state, isDirectory: &isDir) else {
            throw TrainingError("\(state): no such state file or folder (a run's states are in <output_dir>/<output_name>-state)")
        }
        var candidates = [URL(fileURLWithPath: state)]
        if isDir.boolValue {
            var folder = URL(fileURLWithPath: state)
            candidates = try CheckpointWriter.completeStates(in: folder).reversed().map(\.url)
            if candidates.isEmpty {
                // An output_dir: its one `<output_name>-state` folder.
                let sub = ((try? FileManager.default.contentsOfDirectory(atPath: state)) ?? []).filter { $0.hasSuffix("-state") }.sorted()
                if sub.count == 1 {
                    folder = folder.appendingPathComponent(sub[0])
                    candidates = try CheckpointWriter.completeStates(in: folder).reversed().map(\.url)
                }
                guard !candidates.isEmpty else {
                    throw TrainingError("\(state): the folder holds no complete state" + (sub.count > 1 ? " (it has several state folders: \(sub.joined(separator: ", ")); name one)" : " (a run writes them with save_state = true, at a stop, or at the end with save_state_on_train_end)"))
                }
            }
        }
        var problems: [String] = []
        for url in candidates {
            let blobs: [String: [UInt8]], info: StateInfo
            do { (blobs, info) = try Checkpointer.readState(url) } catch { problems.append("\(error)"); continue }
            guard let layoutBytes = blobs["lora.layout"] else {
                throw TrainingError("\(url.path) was written by an older lora-dist that did not store the LoRA layout; resume it once (`lora-dist train CFG --resume \(url.path)`) and export the next state")
            }
            let layout = try JSONDecoder().decode(LoRAFile.Layout.self, from: Data(layoutBytes))
            guard let lora = blobs["lora"], lora.count == layout.parameterCount * 4 else {
                throw TrainingError("\(url.path): the LoRA blob does not match its layout (\(blobs["lora"]?.count ?? 0) bytes for \(layout.parameterCount) parameters)")
            }
            let parameters = lora.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
            let chosen = precision ?? layout.savePrecision ?? "fp32"
            let dtype: DType
            switch chosen {
            case "fp16", "float16": dtype = .f16
            case "bf16", "bfloat16": dtype = .bf16
            case "fp32", "float", "float32": dtype = .f32
            default: throw TrainingError("--precision \(chosen): give fp16, bf16 or fp32")
            }
            let step = info.position.optimizerSteps
            let name = layout.metadata["ss_output_name"].flatMap { $0.isEmpty ? nil : $0 } ?? "lora"
            let folder = url.deletingLastPathComponent().deletingLastPathComponent()
            let path = output ?? folder.appendingPathComponent("\(name)-state-step\(String(format: "%08d", step)).safetensors").path
            var metadata = layout.metadata
            metadata["ss_steps"] = String(step)
            metadata["lora_dist.exported_from"] = url.lastPathComponent
            try LoRAFile.save(layout.tensors(parameters, dtype: dtype), to: path, metadata: metadata)
            return Result(path: path, step: step, state: url.path)
        }
        throw TrainingError("\(state): no readable state:\n  " + problems.joined(separator: "\n  "))
    }
}
