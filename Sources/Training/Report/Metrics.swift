import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What one optimizer step reports (rank 0 writes it; the values are already reduced over ranks).
///
/// JSON form (one line of the metrics JSONL): snake_case keys — step, epoch, loss, loss_average,
/// learning_rates {group: lr}, gradient_norm, step_seconds, communication_seconds, exposed_communication_seconds,
/// compression_ratio,
/// images_per_second, skipped — an absent optional is `null`, and a non-finite number is the string "NaN",
/// "Infinity" or "-Infinity" (JSON has no literal for them; `float("NaN")` in Python reads them back).
public struct StepMetrics: Sendable, Codable, Equatable {
    /// Optimizer step, 1-based (after gradient accumulation).
    public var step: Int
    public var epoch: Int
    /// Mean loss of the step over all ranks, weighted by each rank's sample count (kohya logs rank 0's only).
    public var loss: Double
    /// kohya's `avr_loss`: `MovingLossAverage` over the last steps-per-epoch finite losses.
    public var lossAverage: Double
    /// Learning rate per parameter group, e.g. ["unet": 1e-4, "textencoder": 5e-5].
    public var learningRates: [String: Double]
    /// Global L2 norm of the (averaged) gradient before clipping; nil when not computed.
    public var gradientNorm: Double?
    /// Wall time of the whole optimizer step.
    public var stepSeconds: Double
    /// Time spent in the gradient all-reduce (with overlap_reduction: the communication thread's busy time, mostly
    /// during backward).
    public var communicationSeconds: Double
    /// The part of `stepSeconds` the step waited for the all-reduce (all of it without overlap; with it, what was not
    /// hidden behind backward).
    public var exposedCommunicationSeconds: Double
    /// Uncompressed / wire bytes of the all-reduce; nil without compression (or single rank).
    public var compressionRatio: Double?
    /// Images (all ranks) trained on in this step / stepSeconds.
    public var imagesPerSecond: Double
    /// The loss or gradient was not finite and the update was skipped.
    public var skipped: Bool

    public init(
        step: Int, epoch: Int, loss: Double, lossAverage: Double, learningRates: [String: Double],
        gradientNorm: Double? = nil, stepSeconds: Double, communicationSeconds: Double = 0,
        exposedCommunicationSeconds: Double? = nil, compressionRatio: Double? = nil, imagesPerSecond: Double, skipped: Bool = false
    ) {
        self.exposedCommunicationSeconds = exposedCommunicationSeconds ?? communicationSeconds
        self.step = step
        self.epoch = epoch
        self.loss = loss
        self.lossAverage = lossAverage
        self.learningRates = learningRates
        self.gradientNorm = gradientNorm
        self.stepSeconds = stepSeconds
        self.communicationSeconds = communicationSeconds
        self.compressionRatio = compressionRatio
        self.imagesPerSecond = imagesPerSecond
        self.skipped = skipped
    }

    enum CodingKeys: String, CodingKey {
        case step, epoch, loss
        case lossAverage = "loss_average"
        case learningRates = "learning_rates"
        case gradientNorm = "gradient_norm"
        case stepSeconds = "step_seconds"
        case communicationSeconds = "communication_seconds"
        case exposedCommunicationSeconds = "exposed_communication_seconds"
        case compressionRatio = "compression_ratio"
        case imagesPerSecond = "images_per_second"
        case skipped
    }

    /// Lines written before `exposed_communication_seconds` existed read it as `communication_seconds`.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        step = try c.decode(Int.self, forKey: .step)
        epoch = try c.decode(Int.self, forKey: .epoch)
        loss = try c.decode(Double.self, forKey: .loss)
        lossAverage = try c.decode(Double.self, forKey: .lossAverage)
        learningRates = try c.decode([String: Double].self, forKey: .learningRates)
        gradientNorm = try c.decodeIfPresent(Double.self, forKey: .gradientNorm)
        stepSeconds = try c.decode(Double.self, forKey: .stepSeconds)
        communicationSeconds = try c.decode(Double.self, forKey: .communicationSeconds)
        exposedCommunicationSeconds = try c.decodeIfPresent(Double.self, forKey: .exposedCommunicationSeconds) ?? communicationSeconds
        compressionRatio = try c.decodeIfPresent(Double.self, forKey: .compressionRatio)
        imagesPerSecond = try c.decode(Double.self, forKey: .imagesPerSecond)
        skipped = try c.decode(Bool.self, forKey: .skipped)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(step, forKey: .step)
        try c.encode(epoch, forKey: .epoch)
        try c.encode(loss, forKey: .loss)
        try c.encode(lossAverage, forKey: .lossAverage)
        try c.encode(learningRates, forKey: .learningRates)
        // Explicit nulls: every line has every column (pandas/jq see a stable schema).
        if let gradientNorm { try c.encode(gradientNorm, forKey: .gradientNorm) } else { try c.encodeNil(forKey: .gradientNorm) }
        try c.encode(stepSeconds, forKey: .stepSeconds)
        try c.encode(communicationSeconds, forKey: .communicationSeconds)
        try c.encode(exposedCommunicationSeconds, forKey: .exposedCommunicationSeconds)
        if let compressionRatio { try c.encode(compressionRatio, forKey: .compressionRatio) } else { try c.encodeNil(forKey: .compressionRatio) }
        try c.encode(imagesPerSecond, forKey: .imagesPerSecond)
        try c.encode(skipped, forKey: .skipped)
    }

    /// (tag, value) pairs for TensorBoard, in this order: loss/current, loss/average (kohya's tag names),
    /// lr/<group> (groups sorted by name; kohya: lr/unet, lr/textencoder), grad_norm (when known), time/step,
    /// time/communication, compression_ratio (when known), images_per_second.
    public var scalars: [(tag: String, value: Double)] {
        var out: [(tag: String, value: Double)] = [("loss/current", loss), ("loss/average", lossAverage)]
        for group in learningRates.keys.sorted() { out.append(("lr/\(group)", learningRates[group]!)) }
        if let gradientNorm { out.append(("grad_norm", gradientNorm)) }
        out.append(("time/step", stepSeconds))
        out.append(("time/communication", communicationSeconds))
        if let compressionRatio { out.append(("compression_ratio", compressionRatio)) }
        out.append(("images_per_second", imagesPerSecond))
        return out
    }

    /// The encoder/decoder of the JSONL form (sorted keys, non-finite numbers as strings).
    public static func jsonEncoder() -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "Infinity", negativeInfinity: "-Infinity", nan: "NaN")
        return encoder
    }

    public static func jsonDecoder() -> JSONDecoder {
        let decoder = JSONDecoder()
        decoder.nonConformingFloatDecodingStrategy = .convertFromString(positiveInfinity: "Infinity", negativeInfinity: "-Infinity", nan: "NaN")
        return decoder
    }

    /// Reads a metrics JSONL file back (blank lines, the run-start marker lines and the sample-image lines skipped); an
    /// unreadable line is an error naming its number.
    public static func readJSONL(_ url: URL) throws -> [StepMetrics] {
        let text: String
        do { text = try String(contentsOf: url, encoding: .utf8) } catch {
            throw MetricsError("cannot read the metrics file \(url.path): \(error.localizedDescription)")
        }
        let decoder = jsonDecoder()
        var out: [StepMetrics] = []
        for (index, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated()
        where !line.isEmpty && !line.contains("\"run_start\"") && !line.contains("\"samples_at_step\"") {
            do { out.append(try decoder.decode(StepMetrics.self, from: Data(line.utf8))) } catch {
                throw MetricsError("\(url.path) line \(index + 1) is not a step-metrics record: \(error)")
            }
        }
        return out
    }
}

/// kohya's `avr_loss` (library/train_util.py LossRecorder): the mean of the last `window` losses, where kohya's
/// window is the number of steps per epoch (in epoch 0 it grows to that; from epoch 1 on, each step replaces the
/// loss of the same step one epoch earlier — a ring buffer of one epoch). Non-finite losses (skipped steps) are
/// not recorded, so one NaN does not poison a whole epoch of the average. Codable: it is part of resume state.
public struct MovingLossAverage: Sendable, Codable, Equatable {
    public let window: Int
    /// The recorded losses; once full, `next` is the oldest one's index.
    public private(set) var losses: [Double] = []
    private var next = 0

    public init(window: Int) {
        precondition(window >= 1, "MovingLossAverage window must be >= 1 (got \(window))")
        self.window = window
    }

    /// Records `loss` (if finite) and returns the new average.
    @discardableResult
    public mutating func add(_ loss: Double) -> Double {
        guard loss.isFinite else { return value }
        if losses.count < window {
            losses.append(loss)
        } else {
            losses[next] = loss
            next = (next + 1) % window
        }
        return value
    }

    /// The current mean; NaN before any finite loss was recorded. Summed afresh (no running-sum drift).
    public var value: Double { losses.isEmpty ? .nan : losses.reduce(0, +) / Double(losses.count) }
}

/// Writes each step's metrics to a JSONL file and/or a TensorBoard event file. Rank 0 only.
public final class MetricsWriter {
    public let jsonlURL: URL?
    public let tensorBoard: TensorBoardEventWriter?
    private let jsonl: FileHandle?
    private let clock: () -> Double
    private let encoder = StepMetrics.jsonEncoder()

    /// - jsonl: one JSON object per line (`StepMetrics`' JSON form plus `wall_time`, seconds since 1970), each
    ///   line one `write(2)`: a killed run keeps every completed line. An existing file is appended to, so a
    ///   resumed run continues its log (a step repeated after resuming from an earlier state appears twice; the
    ///   later line is the one that counts).
    /// - tensorboardDirectory: a new `events.out.tfevents.<unix time>.<hostname>.<pid>` file there (see
    ///   `StepMetrics.scalars` for the tags).
    /// - clock: wall time in seconds since 1970 (injected by tests).
    /// - tensorBoardWriterName: the event file's `source_metadata.writer`.
    public init(
        jsonl: URL?, tensorboardDirectory: URL?, clock: @escaping () -> Double = { Date().timeIntervalSince1970 },
        tensorBoardWriterName: String? = "lora-dist"
    ) throws {
        self.clock = clock
        jsonlURL = jsonl
        if let jsonl {
            try? FileManager.default.createDirectory(at: jsonl.deletingLastPathComponent(), withIntermediateDirectories: true)
            let fd = open(jsonl.path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            guard fd >= 0 else {
                throw MetricsError("cannot open the metrics file \(jsonl.path) for appending: \(String(cString: strerror(errno)))")
            }
            self.jsonl = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        } else {
            self.jsonl = nil
        }
        tensorBoard = try tensorboardDirectory.map {
            try TensorBoardEventWriter(directory: $0, wallTime: clock(), writer: tensorBoardWriterName)
        }
    }

    /// The line that starts each process's part of the JSONL (fresh runs and resumes append to one file): when, on how
    /// many ranks, and the step it starts after. It has no "step" key, so readers of step lines skip it.
    public func writeRunStart(ranks: Int, startStep: Int, resumedFrom: String?) throws {
        guard let jsonl, let jsonlURL else { return }
        var o: [String: Any] = ["run_start": ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: clock())),
                                "ranks": ranks, "start_after_step": startStep, "pid": Int(getpid())]
        if let resumedFrom { o["resumed_from"] = resumedFrom }
        var line = try JSONSerialization.data(withJSONObject: o, options: [.sortedKeys])
        line.append(UInt8(ascii: "\n"))
        do { try jsonl.write(contentsOf: line) } catch {
            throw MetricsError("cannot write the metrics file \(jsonlURL.path): \(error.localizedDescription) (disk full?)")
        }
    }

    /// One step: one JSONL line and one event per scalar, all stamped with one `clock()` reading.
    public func write(_ m: StepMetrics) throws {
        let wallTime = clock()
        if let jsonl, let jsonlURL {
            var line = try encoder.encode(JSONLRecord(metrics: m, wallTime: wallTime))
            line.append(UInt8(ascii: "\n"))
            do { try jsonl.write(contentsOf: line) } catch {
                throw MetricsError("cannot write the metrics file \(jsonlURL.path): \(error.localizedDescription) (disk full?)")
            }
        }
        try tensorBoard?.add(scalars: m.scalars, step: m.step, wallTime: wallTime)
    }

    /// One round of sample images: a JSONL line {"samples_at_step", "epoch" (when at an epoch's end), "images",
    /// "sample_seconds", "files"} (no "step" key: readers of step lines skip it) and, in TensorBoard, each image as an
    /// image summary (tag "sample_<prompt index>").
    public func writeSamples(step: Int, epoch: Int?, seconds: Double, files: [String],
                             images: [(tag: String, png: [UInt8], width: Int, height: Int)]) throws {
        let wallTime = clock()
        if let jsonl, let jsonlURL {
            var o: [String: Any] = ["samples_at_step": step, "images": images.count, "sample_seconds": seconds, "files": files,
                                    "wall_time": wallTime]
            if let epoch { o["epoch"] = epoch }
            var line = try JSONSerialization.data(withJSONObject: o, options: [.sortedKeys, .withoutEscapingSlashes])
            line.append(UInt8(ascii: "\n"))
            do { try jsonl.write(contentsOf: line) } catch {
                throw MetricsError("cannot write the metrics file \(jsonlURL.path): \(error.localizedDescription) (disk full?)")
            }
        }
        try tensorBoard?.add(images: images, step: step, wallTime: wallTime)
    }

    public func close() {
        try? jsonl?.close()
        tensorBoard?.close()
    }

    private struct JSONLRecord: Encodable {
        let metrics: StepMetrics
        let wallTime: Double
        enum Keys: String, CodingKey { case wallTime = "wall_time" }
        func encode(to encoder: Encoder) throws {
            try metrics.encode(to: encoder)
            var c = encoder.container(keyedBy: Keys.self)
            try c.encode(wallTime, forKey: .wallTime)
        }
    }
}
