import Foundation

/// File names and keep-last rules for saved LoRAs (kohya train_network.py + AI Toolkit's "max step saves to keep").
public enum SaveNames {
    /// kohya train_util.get_step_ckpt_name: `{output_name}-step{N:08d}.safetensors`.
    public static func step(_ outputName: String, _ step: Int) -> String { "\(outputName)-step\(String(format: "%08d", step)).safetensors" }
    /// kohya train_util.get_epoch_ckpt_name: `{output_name}-{epoch:06d}.safetensors`.
    public static func epoch(_ outputName: String, _ epoch: Int) -> String { "\(outputName)-\(String(format: "%06d", epoch)).safetensors" }
    /// kohya train_util.get_last_ckpt_name: `{output_name}.safetensors`.
    public static func final(_ outputName: String) -> String { "\(outputName).safetensors" }

    /// The step numbers of `{output_name}-stepNNNNNNNN.safetensors` files in `directory`.
    public static func existingSteps(in directory: URL, outputName: String) -> [Int] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
        let prefix = "\(outputName)-step", suffix = ".safetensors"
        return names.compactMap { n -> Int? in
            guard n.hasPrefix(prefix), n.hasSuffix(suffix) else { return nil }
            let digits = n.dropFirst(prefix.count).dropLast(suffix.count)
            return digits.count == 8 ? Int(digits) : nil
        }.sorted()
    }

    public static func existingEpochs(in directory: URL, outputName: String) -> [Int] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
        let prefix = "\(outputName)-", suffix = ".safetensors"
        return names.compactMap { n -> Int? in
            guard n.hasPrefix(prefix), n.hasSuffix(suffix) else { return nil }
            let digits = n.dropFirst(prefix.count).dropLast(suffix.count)
            return digits.count == 6 ? Int(digits) : nil
        }.sorted()
    }

    /// Step files to delete after saving step `current`: kohya's `save_last_n_steps` keeps the files whose step is
    /// greater than `current − N` (its remove_step_no arithmetic removes exactly the one file that falls out of that
    /// window per save; files left over from an earlier cadence fall out the same way here); `keepCount` (AI
    /// Toolkit's max step saves to keep) then keeps only the newest `keepCount` of what is left.
    public static func stepsToRemove(existing: [Int], current: Int, lastNSteps: Int?, keepCount: Int?) -> [Int] {
        var keep = existing.filter { $0 <= current }
        var remove: [Int] = []
        if let n = lastNSteps, n > 0 {
            remove += keep.filter { $0 <= current - n }
            keep = keep.filter { $0 > current - n }
        }
        if let k = keepCount, k >= 0, keep.count > k {
            remove += keep.prefix(keep.count - k)
        }
        return remove.sorted()
    }

    /// kohya `save_last_n_epochs`: keep the epoch files whose epoch is greater than `current − N`.
    public static func epochsToRemove(existing: [Int], current: Int, lastNEpochs: Int?) -> [Int] {
        guard let n = lastNEpochs, n > 0 else { return [] }
        return existing.filter { $0 <= current - n }
    }
}
