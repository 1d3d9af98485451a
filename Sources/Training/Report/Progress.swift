import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The progress display of a training run (rank 0 only; the trainer decides who owns one).
///
/// On a terminal: one line redrawn in place (`\r`, then erase-to-end-of-line), in tqdm's layout as kohya shows it:
///     steps:  42%|████████▍           | 420/1000 [01:23<01:55,  5.03it/s, avr_loss=0.0912]
/// (`s/it` instead of `it/s` below one step per second), redrawn at most every 0.1 s except on the first and
/// last step. Elsewhere (a Slurm log, a pipe): a plain line on the first update, every `logEvery` steps and on
/// the last step:
///     step 420/1000 (42%), avr_loss 0.0912, 5.03 it/s, elapsed 01:23, eta 01:55
/// Rate and ETA count only the steps of this process (from `startStep`), so a resumed run is not credited with
/// the steps before it.
public final class TrainingProgress {
    public let total: Int
    public let startStep: Int
    public let isTerminal: Bool
    public let logEvery: Int
    /// Terminal width: a longer bar line is cut to `columns - 1` characters, since a line that wraps cannot be
    /// redrawn with `\r`. nil: no limit.
    public let columns: Int?
    private let clock: () -> Double
    private let output: (String) -> Void
    private let startTime: Double
    private let barWidth = 20
    /// The bar as last drawn (terminal) and the state it was drawn from.
    private var lastBar: String?
    private var lastDrawTime = -Double.infinity
    private var latest: (step: Int, loss: Double?, extra: String)?
    /// The bar's leading word ("steps" in training; e.g. "image 2/8" for a generated image's sampling steps).
    public let label: String
    private var drawnStep: Int?
    private var finished = false

    /// - total: the last step (the run's max_train_steps).
    /// - startStep: steps already done when this process started (resume), 0 otherwise.
    /// - isTerminal: nil = whether stdout is a terminal.
    /// - columns: nil = the terminal's width (TIOCGWINSZ on stdout) when on a terminal.
    /// - clock: monotonic seconds (injected by tests).
    /// - output: receives exact text to write (it includes the `\r` / `\n`); default: stdout, flushed.
    public init(
        total: Int, startStep: Int = 0, isTerminal: Bool? = nil, logEvery: Int = 10, columns: Int? = nil, label: String = "steps",
        clock: @escaping () -> Double = TrainingProgress.monotonicSeconds,
        output: @escaping (String) -> Void = TrainingProgress.writeToStdout
    ) {
        self.total = max(total, 0)
        self.startStep = startStep
        self.label = label
        self.isTerminal = isTerminal ?? Self.drawsBar()
        self.logEvery = max(logEvery, 1)
        self.columns = columns ?? (self.isTerminal ? Self.terminalColumns() : nil)
        self.clock = clock
        self.output = output
        startTime = clock()
    }

    /// Whether stdout gets the redrawn bar: a terminal, and not one that only looks like it. mpirun gives ranks a pty
    /// whatever its own stdout is (a log file gets the escape codes), and a Slurm/PBS batch job's output is a file.
    /// `LORA_DIST_PROGRESS=bar|lines` decides; otherwise TERM=dumb, NO_COLOR, an MPI launcher or a batch job mean lines.
    public static func drawsBar(_ env: [String: String] = ProcessInfo.processInfo.environment,
                                stdoutIsTTY: Bool = isatty(STDOUT_FILENO) != 0) -> Bool {
        switch env["LORA_DIST_PROGRESS"] {
        case "bar": return true
        case "lines": return false
        default: break
        }
        guard stdoutIsTTY, env["TERM"] != "dumb", env["NO_COLOR"] == nil else { return false }
        if env["OMPI_COMM_WORLD_SIZE"] != nil || env["PMI_SIZE"] != nil || env["PMIX_RANK"] != nil { return false }
        if env["SLURM_JOB_ID"] != nil && env["SLURM_PTY_PORT"] == nil { return false }   // sbatch, not `srun --pty`
        if env["PBS_ENVIRONMENT"] == "PBS_BATCH" { return false }
        return true
    }

    /// After optimizer step `step` (1-based). `loss` is shown as avr_loss: pass `StepMetrics.lossAverage`.
    /// `extra` is appended as is (e.g. "lr=1e-4").
    public func update(step: Int, loss: Double?, extra: String = "") {
        guard !finished else { return }
        let isFirst = latest == nil
        latest = (step, loss, extra)
        let now = clock()
        if isTerminal {
            guard isFirst || step >= total || now - lastDrawTime >= 0.1 else { return }
            draw(now: now)
        } else if isFirst || step % logEvery == 0 || step >= total {
            logLine(now: now)
        }
    }

    /// A message line (a save, a warning) that does not tear the bar: on a terminal the bar is erased, the line
    /// printed, and the bar redrawn below it.
    public func note(_ line: String) {
        if isTerminal, let lastBar {
            output("\r\u{1B}[K" + line + "\n" + lastBar)
        } else {
            output(line + "\n")
        }
    }

    /// Ends the display: the final state is shown (terminal: bar redrawn and the line ended; log: the last step
    /// logged unless it already was). Further updates are ignored.
    public func finish() {
        guard !finished else { return }
        let now = clock()
        if latest != nil {
            if isTerminal {
                if drawnStep != latest!.step || lastBar == nil { draw(now: now) }
                output("\n")
            } else if drawnStep != latest!.step {
                logLine(now: now)
            }
        }
        finished = true
    }

    // MARK: formatting

    private func draw(now: Double) {
        guard let latest else { return }
        var bar = barLine(step: latest.step, loss: latest.loss, extra: latest.extra, elapsed: now - startTime, barWidth: barWidth)
        if let columns, bar.count > columns - 1 {
            // As tqdm does: narrow the bar first (the numbers matter more), then cut what still does not fit.
            let narrower = max(barWidth - (bar.count - (columns - 1)), 0)
            bar = barLine(step: latest.step, loss: latest.loss, extra: latest.extra, elapsed: now - startTime, barWidth: narrower)
            if bar.count > columns - 1 { bar = String(bar.prefix(max(columns - 1, 0))) }
        }
        output("\r" + bar + "\u{1B}[K")
        lastBar = bar
        lastDrawTime = now
        drawnStep = latest.step
    }

    private func logLine(now: Double) {
        guard let latest else { return }
        output(plainLine(step: latest.step, loss: latest.loss, extra: latest.extra, elapsed: now - startTime) + "\n")
        drawnStep = latest.step
    }

    /// Steps per second of this process, nil before one step and some time have passed.
    private func rate(step: Int, elapsed: Double) -> Double? {
        let done = step - startStep
        return done > 0 && elapsed > 0 ? Double(done) / elapsed : nil
    }

    func barLine(step: Int, loss: Double?, extra: String, elapsed: Double, barWidth: Int) -> String {
        let fraction = total > 0 ? min(max(Double(step) / Double(total), 0), 1) : 1
        let rate = rate(step: step, elapsed: elapsed)
        let eta = rate.map { Self.formatInterval(Double(max(total - step, 0)) / $0) } ?? "?"
        let percent = String(format: "%3d%%", percent(step))
        let postfix = ([loss.map { "avr_loss=\(Self.formatLoss($0))" }] + [extra.isEmpty ? nil : extra]).compactMap { $0 }
        return "\(label): \(percent)|\(Self.bar(fraction, width: barWidth))| \(step)/\(total) "
            + "[\(Self.formatInterval(elapsed))<\(eta), \(Self.formatRate(rate))\(postfix.map { ", " + $0 }.joined())]"
    }

    func plainLine(step: Int, loss: Double?, extra: String, elapsed: Double) -> String {
        let rate = rate(step: step, elapsed: elapsed)
        let eta = rate.map { Self.formatInterval(Double(max(total - step, 0)) / $0) } ?? "?"
        let unit = label == "steps" ? "step" : label + ": step"
        var line = "\(unit) \(step)/\(total) (\(percent(step))%), " + (loss.map { "avr_loss \(Self.formatLoss($0)), " } ?? "")
            + "\(Self.formatRate(rate, padded: false)), elapsed \(Self.formatInterval(elapsed)), eta \(eta)"
        if !extra.isEmpty { line += ", " + extra }
        return line
    }

    /// tqdm's bar: full blocks, then one eighth-block for the remainder, padded with spaces.
    static func bar(_ fraction: Double, width: Int) -> String {
        let eighths = Int(fraction * Double(width * 8))
        let full = min(eighths / 8, width)
        var s = String(repeating: "█", count: full)
        if full < width {
            let partial = eighths % 8
            s += partial > 0 ? String(["▏", "▎", "▍", "▌", "▋", "▊", "▉"][partial - 1]) : " "
            s += String(repeating: " ", count: width - full - 1)
        }
        return s
    }

    /// Whole percent done, rounded down, clamped to 0...100.
    private func percent(_ step: Int) -> Int { total > 0 ? min(max(step * 100 / total, 0), 100) : 100 }

    /// tqdm's rate: " 5.03it/s" (padded to keep the bar steady), below one step per second "20.13s/it", unknown
    /// "?it/s". Unpadded (log lines): "5.03 it/s", "20.13 s/it".
    static func formatRate(_ rate: Double?, padded: Bool = true) -> String {
        let unit = padded ? "" : " "
        guard let rate, rate.isFinite, rate > 0 else { return "?\(unit)it/s" }
        let number = padded ? "%5.2f" : "%.2f"
        return rate >= 1 ? String(format: number, rate) + unit + "it/s" : String(format: number, 1 / rate) + unit + "s/it"
    }

    /// tqdm's format_interval: "mm:ss", or "h:mm:ss" from one hour.
    static func formatInterval(_ seconds: Double) -> String {
        guard seconds.isFinite, seconds >= 0 else { return "?" }
        let total = Int(seconds)
        let (h, m, s) = (total / 3600, total / 60 % 60, total % 60)
        return h > 0 ? String(format: "%d:%02d:%02d", h, m, s) : String(format: "%02d:%02d", m, s)
    }

    /// Four significant digits (tqdm's postfix uses 3; losses of 0.1xxx deserve one more).
    static func formatLoss(_ loss: Double) -> String { loss.isNaN ? "nan" : String(format: "%.4g", loss) }

    /// stdout's terminal width, nil when it is not a terminal or reports 0 columns.
    static func terminalColumns() -> Int? {
        var size = winsize()
        guard ioctl(STDOUT_FILENO, UInt(TIOCGWINSZ), &size) == 0, size.ws_col > 0 else { return nil }
        return Int(size.ws_col)
    }

    public static func monotonicSeconds() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

    public static func writeToStdout(_ text: String) {
        fputs(text, stdout)
        fflush(stdout)
    }
}

/// What a finished run prints last: how much was trained, how fast, and the files it wrote.
public struct TrainingSummary: Sendable, Equatable {
    /// Paths of the LoRA files (and state folders) written, in the order written.
    public var filesWritten: [String]
    /// Wall time of the training loop in this process.
    public var seconds: Double
    /// Images trained on in this process, all ranks together.
    public var images: Int
    /// Optimizer steps done in this process.
    public var steps: Int
    public var ranks: Int
    /// Total time in gradient all-reduce, when measured.
    public var communicationSeconds: Double?
    /// The steps whose all-reduce ran during backward: how many, their communication time, and the part of it they
    /// waited for after backward (the rest was hidden); nil: none did.
    public var overlapped: Overlap?

    public struct Overlap: Equatable, Sendable {
        public var steps: Int
        public var communicationSeconds: Double
        public var exposedSeconds: Double
        public init(steps: Int, communicationSeconds: Double, exposedSeconds: Double) {
            self.steps = steps
            self.communicationSeconds = communicationSeconds
            self.exposedSeconds = exposedSeconds
        }
    }
    /// Steps skipped because the loss or gradient was not finite.
    public var skippedSteps: Int
    /// Sample images made during the run (all ranks), the time spent on them (not in `seconds`), and their folder.
    public var sampling: Sampling?

    public struct Sampling: Equatable, Sendable {
        public var images: Int
        public var seconds: Double
        public var folder: String
        public init(images: Int, seconds: Double, folder: String) { self.images = images; self.seconds = seconds; self.folder = folder }
    }

    public init(
        filesWritten: [String], seconds: Double, images: Int, steps: Int, ranks: Int = 1,
        communicationSeconds: Double? = nil, overlapped: Overlap? = nil,
        skippedSteps: Int = 0, sampling: Sampling? = nil
    ) {
        self.sampling = sampling
        self.overlapped = overlapped
        self.filesWritten = filesWritten
        self.seconds = seconds
        self.images = images
        self.steps = steps
        self.ranks = ranks
        self.communicationSeconds = communicationSeconds
        self.skippedSteps = skippedSteps
    }

    public var imagesPerSecond: Double { seconds > 0 ? Double(images) / seconds : 0 }

    /// e.g.
    ///     trained 1000 steps (2000 images) in 1:23:20 on 2 ranks: 0.40 images/s, 5.00 s/step
    ///     communication 04:10 (5.0% of the time)
    ///     wrote 2 files:
    ///       out/lora-000500.safetensors
    ///       out/lora.safetensors
    public func lines() -> [String] {
        var out: [String] = []
        let perStep = steps > 0 ? seconds / Double(steps) : 0
        let stepRate = perStep >= 1 || perStep == 0 ? String(format: "%.2f s/step", perStep) : String(format: "%.2f steps/s", 1 / perStep)
        out.append(
            "trained \(steps) step\(steps == 1 ? "" : "s") (\(images) image\(images == 1 ? "" : "s")) in "
                + TrainingProgress.formatInterval(seconds) + " on \(ranks) rank\(ranks == 1 ? "" : "s"): "
                + String(format: "%.2f images/s", imagesPerSecond) + ", " + stepRate)
        if skippedSteps > 0 {
            out.append("skipped \(skippedSteps) step\(skippedSteps == 1 ? "" : "s") with a non-finite loss or gradient")
        }
        if let communicationSeconds {
            let share = seconds > 0 ? 100 * communicationSeconds / seconds : 0
            var line = "communication " + TrainingProgress.formatInterval(communicationSeconds) + String(format: " (%.1f%% of the time)", share)
            if let o = overlapped, o.steps > 0, o.communicationSeconds > 0 {
                line += String(format: "; in the %d step%@ that overlapped it with backward, %.0f%% of it hidden behind backward",
                               o.steps, o.steps == 1 ? "" : "s", max(0, 100 * (1 - o.exposedSeconds / o.communicationSeconds)))
            }
            out.append(line)
        }
        if let s = sampling, s.images > 0 {
            out.append("sample images: \(s.images) in " + TrainingProgress.formatInterval(s.seconds) + " (not in the training time above) → \(s.folder)")
        }
        if filesWritten.isEmpty {
            out.append("wrote no files")
        } else {
            out.append("wrote \(filesWritten.count) file\(filesWritten.count == 1 ? "" : "s"):")
            out += filesWritten.map { "  " + $0 }
        }
        return out
    }
}
