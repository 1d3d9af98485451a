import ArgumentParser
import Dataset
import Distributed
import Foundation
import Training

/// `lora-dist dataset CONFIG`: what a dataset will train as, before any model is loaded.
struct DatasetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dataset",
        abstract: "Report a dataset: images kept and skipped, buckets, captions, tags, steps per epoch.")

    @Argument(help: "A kohya dataset TOML, a folder (flat, or kohya img/N_name/ subfolders), or builtin:shapes.")
    var config: String

    @Option(help: "Training resolution when CONFIG is a folder.") var resolution = 1024
    @Option(help: "Per-rank batch size when CONFIG is a folder (a TOML's own batch_size wins).") var batchSize = 1
    @Option(help: "Caption file extension when CONFIG is a folder.") var captionExtension = ".txt"
    @Option(help: "Ranks for the steps arithmetic.") var worldSize = 1
    @Option(help: "Epochs for the totals.") var epochs = 1

    func run() throws {
        // builtin:shapes: the synthetic demo set, generated into a per-user temp folder (same seed: same files).
        let report = try resolveDatasetReport(
            config, builtinFolder: FileManager.default.temporaryDirectory.appendingPathComponent("lora-dist-builtin-shapes"),
            resolution: resolution, captionExtension: captionExtension, batchSize: batchSize)
        for line in report.lines() { print(line) }
        let manifest = report.entries.map {
            ManifestEntry(id: $0.image.path, width: $0.placement.bucket.width, height: $0.placement.bucket.height,
                          repeats: $0.image.repeats)
        }
        let coord = try Coordinator(manifest: manifest, seed: 0, worldSize: worldSize, batchSize: report.batchSize,
                                    cacheMode: .shared)
        for line in coord.summary(epochs: epochs) { print(line) }
    }
}
