import Dataset
import Distributed
import Foundation
import SDXL
import Tensor

/// Sample images during training, with kohya's keys and cadence (library/train_util.py `sample_images_common`,
/// `sample_image_inference`; sd-scripts 48d368fa):
///
/// - When: before training when `sample_at_first` (and the run starts at step 0); after optimizer step s when
///   `sample_every_n_steps` divides s and `sample_every_n_epochs` is unset; at the end of epoch e (1-based) when
///   `sample_every_n_epochs` divides e. (kohya: setting the epoch cadence switches the step cadence off.)
/// - What: every entry of `sample_prompts` (.txt/.toml/.json, kohya's syntax), with kohya's defaults for what an entry
///   leaves out (512×512, 30 steps, CFG 7.5, `sample_sampler`), the run's `max_token_length` windows and prompt
///   weighting, v-prediction / zero-terminal SNR from the config, the LoRA as it stands (dropout off); `[trigger]`
///   (and `[name]`) replaced by `[lora_dist] trigger` as AI Toolkit does.
/// - Where: `<output_dir>/sample/<output_name>_<step:06d | e<epoch:06d>>_<index:02d>_<yyyyMMddHHmmss>_<seed>.png` — kohya's
///   names; the seed is always there because every sample has one: a prompt without `--d` takes the run's seed plus
///   its index (kohya draws a random one), so the same prompt is rendered from the same noise at every round and
///   the images show what training changed. Each PNG carries A1111's "parameters" text; TensorBoard (when on) gets
///   each image as `sample_<index>`.
/// - Who: prompt i is rendered by rank i mod N (kohya's split between processes); rank 0 gathers the PNGs and writes
///   them (the one writer of output_dir).
/// - Never touches training's random draws (its noise comes from its own generators; training's draws are derived
///   from the seed and the step, never from a shared stream), so a run trains the same LoRA with and without it.
final class TrainingSampler {
    let prompts: [SamplePrompt]
    let requests: [GenerationRequest]
    let everySteps: Int?
    let everyEpochs: Int?
    let atFirst: Bool
    let folder: URL
    let outputName: String
    private let makeGenerator: () throws -> ImageGenerator
    private var generator: ImageGenerator?
    /// Seconds and images of this process's rounds (the summary's sampling line).
    private(set) var seconds = 0.0
    private(set) var images = 0
    /// Rounds done in this process (every rank takes part in each).
    private(set) var rounds = 0
    private var slowestImage = 0.0

    /// nil when the config asks for no sampling (no cadence); throws on anything wrong with the prompts, before
    /// training starts.
    static func make(config: TrainingConfig, seed: UInt64, outputDirectory: URL,
                     generator: @escaping () throws -> ImageGenerator) throws -> TrainingSampler? {
        let cadence = config.sampleEveryNSteps != nil || config.sampleEveryNEpochs != nil || config.sampleAtFirst
        guard cadence else { return nil }
        guard let path = config.samplePrompts else {
            throw TrainingConfigError(file: config.sourceFile, key: "sample_prompts",
                                      "sampling is on (\(cadenceText(config))) but no sample_prompts file is given — add sample_prompts = \"prompts.txt\" (one prompt per line, kohya's --n/--w/--h/--d/--l/--s/--ss options) or remove the cadence")
        }
        let sampler: SamplerChoice
        do { sampler = try SamplerChoice(parsing: config.sampleSampler) } catch {
            throw TrainingConfigError(file: config.sourceFile, key: "sample_sampler", "\(error)")
        }
        var prompts: [SamplePrompt]
        do { prompts = try SamplePrompt.load(path: path) } catch {
            throw TrainingConfigError(file: config.sourceFile, key: "sample_prompts", "\(error)")
        }
        if let trigger = config.lora.trigger {
            // AI Toolkit's sample prompts: `[trigger]` (and `[name]`, as in captions) stand for the trigger word.
            func fill(_ s: String) -> String { s.replacingOccurrences(of: "[trigger]", with: trigger).replacingOccurrences(of: "[name]", with: trigger) }
            for i in prompts.indices {
                prompts[i].prompt = fill(prompts[i].prompt)
                prompts[i].negativePrompt = prompts[i].negativePrompt.map(fill)
            }
        }
        let defaults = SamplePromptDefaults.kohya(sampler: sampler)
        let requests: [GenerationRequest]
        do {
            requests = try prompts.map { p in try p.request(defaults: defaults, seed: seed &+ UInt64(p.index)) }
            for r in requests {
                try r.validate()
                _ = try PromptAttention.parse(r.prompt)
                _ = try PromptAttention.parse(r.negativePrompt)
            }
        } catch {
            throw TrainingConfigError(file: config.sourceFile, key: "sample_prompts", "\(path): \(error)")
        }
        return TrainingSampler(prompts: prompts, requests: requests, config: config,
                               folder: outputDirectory.appendingPathComponent("sample"), generator: generator)
    }

    private init(prompts: [SamplePrompt], requests: [GenerationRequest], config: TrainingConfig, folder: URL,
                 generator: @escaping () throws -> ImageGenerator) {
        self.prompts = prompts
        self.requests = requests
        everySteps = config.sampleEveryNSteps
        everyEpochs = config.sampleEveryNEpochs
        atFirst = config.sampleAtFirst
        self.folder = folder
        outputName = config.outputName
        makeGenerator = generator
    }

    static func cadenceText(_ c: TrainingConfig) -> String {
        [c.sampleEveryNSteps.map { "sample_every_n_steps = \($0)" }, c.sampleEveryNEpochs.map { "sample_every_n_epochs = \($0)" },
         c.sampleAtFirst ? "sample_at_first" : nil].compactMap { $0 }.joined(separator: ", ")
    }

    /// The start-up line.
    var summary: String {
        "sample images: \(requests.count) prompt\(requests.count == 1 ? "" : "s") (\(requests.map { "\($0.width)×\($0.height)" }.uniqued().joined(separator: ", ")), "
            + "\(Set(requests.map(\.sampler.description)).sorted().joined(separator: ", "))) "
            + [atFirst ? "before training" : nil, everySteps.map { "every \($0) steps" }.flatMap { everyEpochs == nil ? $0 : nil },
               everyEpochs.map { "every \($0) epoch\($0 == 1 ? "" : "s")" }].compactMap { $0 }.joined(separator: ", ")
            + " → \(folder.path)"
    }

    /// kohya's condition (`steps` = optimizer steps done; `epoch`: 0 for the call before training, e for the end of
    /// epoch e, nil after a step).
    func due(steps: Int, epoch: Int?) -> Bool {
        if steps == 0 { return atFirst && epoch == 0 }
        if let n = everyEpochs { return epoch.map { $0 > 0 && $0 % n == 0 } ?? false }
        guard let n = everySteps else { return false }
        return epoch == nil && steps % n == 0
    }

    /// Renders every prompt (this rank's share), gathers the PNGs on rank 0, which writes them and the metrics.
    /// Collective. Returns the files written (rank 0).
    @discardableResult
    func sample(steps: Int, epoch: Int?, network: LoRANetwork?, communicator: any Communicator,
                metrics: MetricsWriter?, say: (String) -> Void) throws -> [String] {
        let start = Date()
        if generator == nil { generator = try makeGenerator() }
        let generator = generator!
        let wasTraining = network?.training ?? false
        network?.training = false        // inference: no LoRA dropout
        defer { network?.training = wasTraining }
        generator.adapters = network

        // Other ranks wait in the gather while this one renders: give the collective the time this round may take.
        let mine = requests.indices.filter { $0 % communicator.size == communicator.rank }
        let perRank = (requests.count + communicator.size - 1) / communicator.size
        let saved = communicator.timeout
        if let t = saved { communicator.timeout = t + max(600, 3 * Double(perRank) * slowestImage) }
        defer { communicator.timeout = saved }
        let waiting = communicator.waitingFor
        communicator.waitingFor = "sample images after step \(steps)"
        defer { communicator.waitingFor = waiting }

        var blob: [UInt8] = []
        for i in mine {
            let r = requests[i]
            let image = try generator.generate(r)
            slowestImage = max(slowestImage, image.seconds)
            let png = try ImageIO.encodePNG(image.rgb, width: r.width, height: r.height,
                                            text: [("parameters", r.parametersText(model: nil, extra: [("Step", "\(steps)")]))])
            SampleBlob.append(&blob, index: i, width: r.width, height: r.height, png: png)
        }
        let all = try communicator.allGather(blob)
        var files: [String] = []
        if communicator.rank == 0 {
            try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
            var summaries: [(tag: String, png: [UInt8], width: Int, height: Int)] = []
            let stamp = TrainingSampler.timestamp()
            let suffix = epoch.map { String(format: "e%06d", $0) } ?? String(format: "%06d", steps)
            for entry in try all.flatMap(SampleBlob.entries).sorted(by: { $0.index < $1.index }) {
                let r = requests[entry.index]
                let name = "\(outputName)_\(suffix)_\(String(format: "%02d", prompts[entry.index].index))_\(stamp)_\(r.seed).png"
                let url = folder.appendingPathComponent(name)
                try Data(entry.png).write(to: url, options: .atomic)
                files.append(url.path)
                summaries.append((tag: "sample_\(prompts[entry.index].index)", png: entry.png, width: entry.width, height: entry.height))
            }
            let took = Date().timeIntervalSince(start)
            try metrics?.writeSamples(step: steps, epoch: epoch, seconds: took, files: files, images: summaries)
            say("sample images \(steps == 0 ? "before training" : epoch.map { "at epoch \($0) (step \(steps))" } ?? "at step \(steps)"): \(files.count) in \(String(format: "%.1f", took)) s → \(folder.path)")
        }
        seconds += Date().timeIntervalSince(start)
        images += mine.count
        rounds += 1
        return files
    }

    /// kohya's `time.strftime("%Y%m%d%H%M%S", time.localtime())`.
    static func timestamp(_ date: Date = Date()) -> String {
        let f = DateFormatter()
        f.locale = Locale(identifier: "en_US_POSIX")
        f.timeZone = TimeZone.current
        f.dateFormat = "yyyyMMddHHmmss"
        return f.string(from: date)
    }
}

/// The PNGs one rank sends to rank 0: per image index, width, height (u32 each), PNG length (u32), PNG bytes.
enum SampleBlob {
    static func append(_ blob: inout [UInt8], index: Int, width: Int, height: Int, png: [UInt8]) {
        for v in [index, width, height, png.count] { withUnsafeBytes(of: UInt32(v).littleEndian) { blob += $0 } }
        blob += png
    }

    static func entries(_ blob: [UInt8]) throws -> [(index: Int, width: Int, height: Int, png: [UInt8])] {
        var out: [(index: Int, width: Int, height: Int, png: [UInt8])] = []
        var i = 0
        func u32() throws -> Int {
            guard i + 4 <= blob.count else { throw TrainingError("sample images: a truncated image message from another rank") }
            defer { i += 4 }
            return Int(UInt32(blob[i]) | UInt32(blob[i + 1]) << 8 | UInt32(blob[i + 2]) << 16 | UInt32(blob[i + 3]) << 24)
        }
        while i < blob.count {
            let index = try u32(), width = try u32(), height = try u32(), length = try u32()
            guard i + length <= blob.count else { throw TrainingError("sample images: a truncated image message from another rank") }
            out.append((index, width, height, Array(blob[i..<(i + length)])))
            i += length
        }
        return out
    }
}

extension Array where Element: Hashable {
    /// The elements in order, each once.
    func uniqued() -> [Element] {
        var seen = Set<Element>()
        return filter { seen.insert($0).inserted }
    }
}
