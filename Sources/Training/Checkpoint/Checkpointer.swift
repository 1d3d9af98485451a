import Distributed
import Foundation
import SafeTensors
import Tensor

/// Where a run is: optimizer steps done and the next micro-step of the epoch plan. Saved in every state.
public struct TrainingPosition: Codable, Equatable, Sendable {
    public var optimizerSteps = 0
    public var epoch = 0
    /// Index of the next micro-step in `plan(epoch:)`.
    public var nextStep = 0
    public var nonFiniteRun = 0
    public var skippedSteps = 0
    public var losses: [Double] = []      // the moving window behind the average shown
    public init() {}
}

/// The metadata blob of a resumable state.
struct StateInfo: Codable {
    var format = 1
    var position: TrainingPosition
    var worldSize: Int
    var fingerprint: String
    var seed: UInt64
    var optimizer: String
    var wireFormat: String
    var trainingStartedAt: Double
    /// Since issue 13 (absent in older states): the fingerprinted settings key by key, the manifest's sample ids,
    /// the micro-steps per epoch and the batch shape of the writing run — what a resume compares to say what changed
    /// and to carry the position to another world size.
    var settings: [String: String]? = nil
    var samples: [String]? = nil
    var stepsPerEpoch: Int? = nil
    var batchSize: Int? = nil
    var gradientAccumulation: Int? = nil
}

/// What a resume found and did, for the lines the loop prints.
struct Restored {
    var position: TrainingPosition
    var url: URL
    var notes: [String] = []
}

/// Stage 5 — what a run leaves on disk: kohya-format LoRA files (with kohya's metadata) on the save cadences with
/// kohya's and AI Toolkit's keep rules, and resumable states (LoRA values, optimizer state, position in the data plan,
/// every rank's wire-format residual). Rank 0 writes, atomically; the state save is collective.
final class Checkpointer {
    let config: TrainingConfig
    let communicator: any Communicator
    let plan: TrainingPlan
    let network: LoRANetwork
    let optimizer: Optimizer
    let reducer: GradientAllReduce
    let outputDirectory: URL
    let stateDirectory: URL
    /// When training started (a resumed run keeps the first run's time, for ss_training_started_at).
    var startedAt = Date()
    private(set) var filesWritten: [String] = []
    /// The immediate stop of a CLI run (nil in-process): rank 0's file writes hold its lock, so a stop never writes
    /// into the folder at the same time, nor exits halfway through a file.
    var stop: ImmediateStop?

    var rank: Int { communicator.rank }
    var worldSize: Int { communicator.size }

    init(config: TrainingConfig, communicator: any Communicator, plan: TrainingPlan, network: LoRANetwork,
         optimizer: Optimizer, reducer: GradientAllReduce, outputDirectory: URL) {
        self.config = config
        self.communicator = communicator
        self.plan = plan
        self.network = network
        self.optimizer = optimizer
        self.reducer = reducer
        self.outputDirectory = outputDirectory
        stateDirectory = outputDirectory.appendingPathComponent("\(config.outputName)-state")
    }

    // MARK: LoRA files

    func saveLoRA(_ name: String, position: TrainingPosition, progress: TrainingProgress?, final: Bool = false) throws {
        guard rank == 0 else { return }
        let url = outputDirectory.appendingPathComponent(name)
        let dtype: DType = config.savePrecision == "fp16" ? .f16 : config.savePrecision == "bf16" ? .bf16 : .f32
        try exclusive {
            _ = try LoRAFile.save(network, to: url.path, dtype: dtype, metadata: loraMetadata(position: position, final: final))
            filesWritten.append(url.path)   // under the lock: the stop thread's writeState appends too
        }
        progress?.note("saved \(url.path)")
    }

    /// A step save (`save_every_n_steps`), then the keep rules, then a state if `save_state`.
    func saveStep(_ position: TrainingPosition, progress: TrainingProgress?) throws {
        let step = position.optimizerSteps
        try saveLoRA(SaveNames.step(config.outputName, step), position: position, progress: progress)
        if rank == 0 {
            let existing = SaveNames.existingSteps(in: outputDirectory, outputName: config.outputName)
            for s in SaveNames.stepsToRemove(existing: existing, current: step, lastNSteps: config.saveLastNSteps,
                                             keepCount: config.lora.keepStepSaves) {
                try? FileManager.default.removeItem(at: outputDirectory.appendingPathComponent(SaveNames.step(config.outputName, s)))
            }
        }
        if config.saveState { try saveState(position) }
    }

    /// An epoch save (`save_every_n_epochs`), kohya's `save_last_n_epochs`, a state if `save_state`.
    func saveEpoch(_ epoch: Int, position: TrainingPosition, progress: TrainingProgress?) throws {
        try saveLoRA(SaveNames.epoch(config.outputName, epoch), position: position, progress: progress)
        if rank == 0 {
            for e in SaveNames.epochsToRemove(existing: SaveNames.existingEpochs(in: outputDirectory, outputName: config.outputName),
                                              current: epoch, lastNEpochs: config.saveLastNEpochs) {
                try? FileManager.default.removeItem(at: outputDirectory.appendingPathComponent(SaveNames.epoch(config.outputName, e)))
            }
        }
        if config.saveState { try saveState(position) }
    }

    // MARK: states

    /// Everything to continue bit-identically: LoRA values, optimizer state, position, and (bf16 wire) every rank's
    /// error-feedback residual. Collective (residuals are gathered); rank 0 writes atomically.
    func saveState(_ position: TrainingPosition) throws {
        // The other ranks wait in the barrier below while rank 0 writes: give them the write's time on top of the
        // collective timeout (16 bytes per parameter — values, gradient-sized optimizer moments — at a slow 50 MB/s),
        // so that a small collective_timeout does not end a run whose state file is large.
        let timeout = communicator.timeout
        if let t = timeout, t > 0 { communicator.timeout = t + Double(16 * network.parameterCount) / 50e6 }
        defer { communicator.timeout = timeout }
        var residualBlobs: [[UInt8]] = []
        if config.lora.wireFormat == .bf16 {
            residualBlobs = try communicator.allGather(reducer.residual.withUnsafeBytes { Array($0) })
        }
        guard rank == 0 else { try communicator.barrier(); return }
        try exclusive {
            _ = try writeState(position, residualBlobs: residualBlobs)
            stop?.stateSaved(step: position.optimizerSteps)
        }
        try communicator.barrier()
    }

    /// Rank 0's part of a state save, no collective (`ImmediateStop` calls it alone, with no residuals: they are
    /// other ranks' memory). Returns the file written.
    func writeState(_ position: TrainingPosition, residualBlobs: [[UInt8]]) throws -> URL? {
        let c = plan.coordinator
        let info = StateInfo(position: position, worldSize: worldSize, fingerprint: config.fingerprint, seed: plan.seed,
                             optimizer: optimizer.name, wireFormat: config.lora.wireFormat.rawValue,
                             trainingStartedAt: startedAt.timeIntervalSince1970,
                             settings: Dictionary(config.fingerprintParts.map { ($0.key, $0.value) }, uniquingKeysWith: { $1 }),
                             samples: c.sampleIDs, stepsPerEpoch: c.stepsPerEpoch, batchSize: c.batchSize,
                             gradientAccumulation: c.gradientAccumulation)
        var blobs: StateBlobList = [("info.json", Array(try JSONEncoder().encode(info)))]
        blobs.append(("lora", StateBlob.raw(network.parameters)))
        // The file layout and metadata, so `lora-dist export` makes a LoRA file from this state alone.
        let layout = LoRAFile.Layout(network, metadata: loraMetadata(position: position, final: false),
                                     savePrecision: config.savePrecision)
        blobs.append(("lora.layout", Array(try JSONEncoder().encode(layout))))
        for (name, bytes) in optimizer.stateBlobs() { blobs.append(("optimizer." + name, bytes)) }
        for (r, bytes) in residualBlobs.enumerated() { blobs.append(("residual.\(r)", bytes)) }
        let writer = try CheckpointWriter(directory: stateDirectory, rank: rank, every: 1, keep: config.lora.keepStates)
        let url = try writer.write(step: position.optimizerSteps, blobs: blobs)
        if let url { filesWritten.append(url.path) }
        return url
    }

    private func exclusive<T>(_ body: () throws -> T) rethrows -> T {
        guard let stop else { return try body() }
        return try stop.locked(body)
    }

    /// Whether this run's state folder holds a complete state (rank 0 decides, every rank gets its answer: the
    /// branch `--resume auto` takes must be the same everywhere). Collective.
    func hasState() throws -> Bool {
        var found: [UInt8] = [rank == 0 && ((try? CheckpointWriter.newestState(in: stateDirectory)) ?? nil) != nil ? 1 : 0]
        try communicator.broadcast(&found, root: 0)
        return found[0] == 1
    }

    /// The newest state's path, for messages.
    var newestStatePath: String { (try? CheckpointWriter.newestState(in: stateDirectory))??.url.path ?? "none written" }

    /// Reads a state (a state file, or the state folder: its newest readable state — a corrupt or truncated newer one is
    /// skipped, saying so), checks it belongs to this run (naming the settings that changed), carries its position to
    /// this run's world size and dataset when they differ, and puts its values into the network, the optimizer and
    /// the reducer.
    func restore(from path: String) throws -> Restored {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw TrainingError("--resume \(path): no such state file or folder")
        }
        var notes: [String] = []
        if isDir.boolValue {
            let states = try CheckpointWriter.completeStates(in: URL(fileURLWithPath: path))
            guard !states.isEmpty else { throw TrainingError("--resume \(path): the folder holds no complete state") }
            for (i, state) in states.reversed().enumerated() {
                let blobs: [String: [UInt8]], info: StateInfo
                do { (blobs, info) = try Self.readState(state.url) } catch {
                    notes.append("state \(state.url.lastPathComponent) cannot be used (\(error))" + (i + 1 < states.count ? "; trying the next older one" : ""))
                    continue
                }
                var restored = try apply(blobs, info: info, url: state.url)
                restored.notes = notes + restored.notes
                return restored
            }
            throw TrainingError("--resume \(path): no state in the folder can be read:\n  " + notes.joined(separator: "\n  "))
        }
        let url = URL(fileURLWithPath: path)
        let (blobs, info) = try Self.readState(url)
        return try apply(blobs, info: info, url: url)
    }

    static func readState(_ url: URL) throws -> ([String: [UInt8]], StateInfo) {
        let blobs = try StateBlobs.read(url)
        guard let infoBytes = blobs["info.json"], let info = try? JSONDecoder().decode(StateInfo.self, from: Data(infoBytes)) else {
            throw TrainingError("\(url.path): not a lora-dist training state (no info.json blob)")
        }
        return (blobs, info)
    }

    private func apply(_ blobs: [String: [UInt8]], info: StateInfo, url: URL) throws -> Restored {
        var notes: [String] = []
        try checkSettings(info, url: url)
        guard let lora = blobs["lora"], lora.count == network.parameterCount * 4 else {
            throw TrainingError("\(url.path): the LoRA blob is missing or has the wrong size for this network")
        }
        var position = info.position
        let c = plan.coordinator
        // The dataset: the same settings may list other images (added or removed files). Accepted — a user who adds
        // images to a running job means it — and said; the plan of the rest of the epoch is the new dataset's.
        var dataChanged = false
        if let old = info.samples {
            let was = Set(old), now = Set(c.sampleIDs)
            let added = now.subtracting(was).sorted(), removed = was.subtracting(now).sorted()
            if !added.isEmpty || !removed.isEmpty {
                dataChanged = true
                func list(_ ids: [String]) -> String { ids.prefix(3).joined(separator: ", ") + (ids.count > 3 ? ", …" : "") }
                notes.append("dataset changed since the state: \(added.count) image(s) added\(added.isEmpty ? "" : " (\(list(added)))"), \(removed.count) removed\(removed.isEmpty ? "" : " (\(list(removed)))"); training continues at step \(position.optimizerSteps) with the new dataset")
            }
        }
        // Elastic resume: the LoRA, the optimizer state and the step count do not depend on the world size; the data
        // plan does. The position moves to the same fraction of the epoch in the new plan.
        if info.worldSize != worldSize || dataChanged {
            let oldSteps = info.stepsPerEpoch ?? ((try? c.resized(worldSize: info.worldSize))?.stepsPerEpoch ?? c.stepsPerEpoch)
            let fraction = oldSteps > 0 ? Double(min(position.nextStep, oldSteps)) / Double(oldSteps) : 0
            var next = Int((fraction * Double(c.stepsPerEpoch)).rounded(.down))
            next -= next % c.gradientAccumulation   // at the start of an accumulation window
            position.nextStep = min(next, c.stepsPerEpoch)
            if info.worldSize != worldSize {
                let batch = info.batchSize ?? c.batchSize, accumulation = info.gradientAccumulation ?? c.gradientAccumulation
                let before = batch * accumulation * info.worldSize, after = c.globalBatch
                var line = "resuming a \(info.worldSize)-rank state on \(worldSize) rank\(worldSize == 1 ? "" : "s"): LoRA, optimizer state and step \(position.optimizerSteps) carry over; the rest of epoch \(position.epoch + 1) follows the \(worldSize)-rank plan from its micro-step \(position.nextStep) of \(c.stepsPerEpoch) (the same fraction of the epoch; its images are re-dealt, so until the epoch ends some may come twice and others not at all). Global batch \(before) = \(batch) × \(accumulation) × \(info.worldSize) ranks → \(after) = \(c.batchSize) × \(c.gradientAccumulation) × \(worldSize)"
                if before != after {
                    let keep = before % (c.batchSize * worldSize) == 0 ? before / (c.batchSize * worldSize) : nil
                    line += "; the optimizer now averages over \(after) samples per step instead of \(before)"
                        + (keep.map { " (gradient_accumulation_steps = \($0) would keep \(before))" } ?? "")
                }
                notes.append(line)
                if config.lora.wireFormat == .bf16 { notes.append("wire_format bf16: the per-rank error-feedback residuals start at zero (they belong to the old ranks)") }
            }
        }
        network.parameters = lora.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        var optimizerBlobs: [String: [UInt8]] = [:]
        for (k, v) in blobs where k.hasPrefix("optimizer.") { optimizerBlobs[String(k.dropFirst("optimizer.".count))] = v }
        try optimizer.restore(optimizerBlobs)
        if config.lora.wireFormat == .bf16, info.worldSize == worldSize, let residual = blobs["residual.\(rank)"] {
            try reducer.restoreResidual(residual.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) })
        }
        startedAt = Date(timeIntervalSince1970: info.trainingStartedAt)
        return Restored(position: position, url: url, notes: notes)
    }

    /// Refuses a state written with other settings, naming each changed key (from the state's `settings`).
    func checkSettings(_ info: StateInfo, url: URL) throws {
        guard info.fingerprint == config.fingerprint else {
            var what = "model, dataset, network, optimizer, schedule, seed, batch or loss settings"
            if let old = info.settings {
                let now = Dictionary(config.fingerprintParts.map { ($0.key, $0.value) }, uniquingKeysWith: { $1 })
                let changed = Set(old.keys).union(now.keys).sorted().filter { old[$0] != now[$0] }
                if !changed.isEmpty {
                    what = changed.map { "\($0): \(Self.show(old[$0])) → \(Self.show(now[$0]))" }.joined(separator: "; ")
                }
            }
            throw TrainingError("\(url.path): the configuration changed since this state was written (\(what)). Resume with the same settings, or start a new run (another output_dir, or without --resume)")
        }
    }

    /// Before any expensive work (the latent cache): the state `--resume` will use must belong to this configuration.
    /// Reads only its info blob; the full check (checksum, fallback past a corrupt state) is `restore`'s. Collective
    /// when `resume` is auto.
    func preflight(resume: String?) throws {
        guard var from = resume else { return }
        if from == "auto" {
            guard try hasState() else { return }
            from = stateDirectory.path
        }
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: from, isDirectory: &isDir) else {
            throw TrainingError("--resume \(from): no such state file or folder")
        }
        let url = isDir.boolValue ? (try CheckpointWriter.newestState(in: URL(fileURLWithPath: from)))?.url : URL(fileURLWithPath: from)
        guard let url, let bytes = StateBlobs.peek(url, blob: "info.json"),
              let info = try? JSONDecoder().decode(StateInfo.self, from: Data(bytes)) else { return }
        try checkSettings(info, url: url)
    }

    private static func show(_ v: String?) -> String {
        guard var v else { return "(absent)" }
        // fingerprintParts quote each value (String(reflecting:)): "4" reads better as 4.
        if v.count >= 2, v.hasPrefix("\""), v.hasSuffix("\""), !v.dropFirst().dropLast().contains("\"") {
            v = String(v.dropFirst().dropLast())
        }
        return v.count > 80 ? String(v.prefix(77)) + "…" : v
    }
}
