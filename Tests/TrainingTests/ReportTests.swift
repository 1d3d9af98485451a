import Foundation
import XCTest

@testable import Training

/// Progress display, metrics files (JSONL, TensorBoard events) and the final summary.
final class ReportTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/training")
    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("report-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: dir) }

    // MARK: CRC-32C

    /// RFC 3720 (iSCSI) appendix B.4 test vectors, and the CRC catalogue's check value for "123456789".
    func testCRC32CKnownVectors() {
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0, count: 32)), 0x8A91_36AA)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)), 0x62A8_AB43)
        XCTAssertEqual(CRC32C.checksum((0..<32).map { UInt8($0) }), 0x46DD_794E)
        XCTAssertEqual(CRC32C.checksum((0..<32).reversed().map { UInt8($0) }), 0x113F_DB5C)
        let iscsiReadPDU: [UInt8] = [
            0x01, 0xC0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18,
            0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ]
        XCTAssertEqual(CRC32C.checksum(iscsiReadPDU), 0xD996_3A56)
        XCTAssertEqual(CRC32C.checksum(Array("123456789".utf8)), 0xE306_9283)
        XCTAssertEqual(CRC32C.checksum([]), 0)
    }

    // MARK: TensorBoard + JSONL

    struct GoldenInput: Decodable {
        struct Step: Decodable { let wall_time: Double }
        let file_version_wall_time: Double
        let steps: [Step]
    }

    /// The metrics of Tests/Fixtures/training/tfevents_input.json (decoded with the JSONL decoder) and their
    /// wall times, as make_tfevents.py fed them to torch's SummaryWriter.
    func goldenInput() throws -> (metrics: [StepMetrics], clock: [Double]) {
        let data = try Data(contentsOf: Self.fixtures.appendingPathComponent("tfevents_input.json"))
        struct Wrapper: Decodable { let steps: [StepMetrics] }
        let metrics = try StepMetrics.jsonDecoder().decode(Wrapper.self, from: data).steps
        let times = try JSONDecoder().decode(GoldenInput.self, from: data)
        return (metrics, [times.file_version_wall_time] + times.steps.map(\.wall_time))
    }

    /// A clock that returns the given readings in order and fails the test if read more often.
    func replay(_ readings: [Double]) -> () -> Double {
        var remaining = readings[...]
        return {
            guard let next = remaining.popFirst() else {
                XCTFail("clock read more often than the reference wrote events")
                return 0
            }
            return next
        }
    }

    /// The event file equals, byte for byte, what `torch.utils.tensorboard.SummaryWriter` (tensorboard 2.21
    /// EventFileWriter) wrote for the same scalars and wall times (Tests/Fixtures/training/make_tfevents.py).
    /// The writer name is set to tensorboard's own so the file_version record can match too.
    func testEventFileEqualsTensorBoardWriter() throws {
        let (metrics, clock) = try goldenInput()
        XCTAssertEqual(metrics.count, 4)
        let tbDir = dir.appendingPathComponent("tb")
        let writer = try MetricsWriter(
            jsonl: nil, tensorboardDirectory: tbDir, clock: replay(clock),
            tensorBoardWriterName: "tensorboard.summary.writer.event_file_writer")
        for m in metrics { try writer.write(m) }
        writer.close()

        let files = try FileManager.default.contentsOfDirectory(atPath: tbDir.path)
        XCTAssertEqual(files.count, 1)
        let name = try XCTUnwrap(files.first)
        XCTAssertTrue(name.hasPrefix("events.out.tfevents.\(Int(clock[0])).\(TensorBoardEventWriter.hostname())."), name)
        let ours = try [UInt8](Data(contentsOf: tbDir.appendingPathComponent(name)))
        let golden = try [UInt8](Data(contentsOf: Self.fixtures.appendingPathComponent("tfevents_golden.bin")))
        if ours != golden {
            // Say which record differs rather than dumping two 1.7 KB blobs.
            let (a, b) = (try TensorBoardEvent.records(in: ours), try TensorBoardEvent.records(in: golden))
            XCTAssertEqual(a.count, b.count, "record count")
            for (i, (x, y)) in zip(a, b).enumerated() where x != y {
                XCTFail("record \(i) differs:\n ours   \(x)\n golden \(y)")
                break
            }
            XCTFail("event file differs from tfevents_golden.bin")
        }
    }

    func testEventReaderFindsEveryRecordAndRejectsTornOnes() throws {
        let golden = try [UInt8](Data(contentsOf: Self.fixtures.appendingPathComponent("tfevents_golden.bin")))
        // make_tfevents.py: 1 file_version record + 32 scalars (10 + 7 + 8 + 7 tags over the 4 steps).
        let records = try TensorBoardEvent.records(in: golden)
        XCTAssertEqual(records.count, 33)
        XCTAssertEqual(records[0], TensorBoardEvent.fileVersion(
            wallTime: 1_763_740_800.125, writer: "tensorboard.summary.writer.event_file_writer"))
        XCTAssertThrowsError(try TensorBoardEvent.records(in: Array(golden.dropLast(3))))
        var flipped = golden
        flipped[40] ^= 1
        XCTAssertThrowsError(try TensorBoardEvent.records(in: flipped))
    }

    /// JSONL: every line decodes back to the metrics written (NaN/Infinity included), carries the clock's
    /// wall time, and is on disk as soon as `write` returns (before close).
    func testJSONLRoundTripAndFlushPerLine() throws {
        let (metrics, clock) = try goldenInput()
        let url = dir.appendingPathComponent("logs/metrics.jsonl")
        let writer = try MetricsWriter(jsonl: url, tensorboardDirectory: nil, clock: replay(Array(clock.dropFirst())))
        try writer.write(metrics[0])
        try writer.write(metrics[1])
        // Not closed yet: what a killed run leaves.
        XCTAssertEqual(try StepMetrics.readJSONL(url), Array(metrics[0..<2]))
        try writer.write(metrics[2])
        try writer.write(metrics[3])
        writer.close()

        let back = try StepMetrics.readJSONL(url)
        XCTAssertEqual(back.count, 4)
        let encoder = StepMetrics.jsonEncoder()
        for (a, b) in zip(back, metrics) {
            // Encoded comparison: metrics[2] has a NaN loss, which == never equals.
            XCTAssertEqual(try encoder.encode(a), try encoder.encode(b))
        }
        XCTAssertTrue(back[2].loss.isNaN)
        XCTAssertEqual(back[2].gradientNorm, .infinity)
        XCTAssertNil(back[1].gradientNorm)
        XCTAssertEqual(back[0].learningRates, ["unet": 1e-4, "textencoder": 5e-5])

        let lines = try String(contentsOf: url, encoding: .utf8).split(separator: "\n")
        XCTAssertEqual(lines.count, 4)
        for (line, wallTime) in zip(lines, clock.dropFirst()) {
            let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            XCTAssertEqual(object["wall_time"] as? Double, wallTime)
            XCTAssertEqual(Set(object.keys), [
                "step", "epoch", "loss", "loss_average", "learning_rates", "gradient_norm", "step_seconds",
                "communication_seconds", "exposed_communication_seconds", "compression_ratio", "images_per_second", "skipped", "wall_time",
            ])
        }
        XCTAssertTrue(lines[2].contains("\"loss\":\"NaN\""), String(lines[2]))
        XCTAssertTrue(lines[1].contains("\"gradient_norm\":null"), String(lines[1]))

        // A resumed run appends to the same file.
        let resumed = try MetricsWriter(jsonl: url, tensorboardDirectory: nil, clock: { 0 })
        try resumed.write(metrics[3])
        resumed.close()
        XCTAssertEqual(try StepMetrics.readJSONL(url).count, 5)
    }

    func testBadJSONLLineAndUnwritableDirectoryAreNamed() throws {
        let url = dir.appendingPathComponent("bad.jsonl")
        try "{\"step\": 1}\n".write(to: url, atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try StepMetrics.readJSONL(url)) { error in
            XCTAssertTrue("\(error)".contains("bad.jsonl line 1"), "\(error)")
        }
        let blocker = dir.appendingPathComponent("file")
        try Data().write(to: blocker)
        XCTAssertThrowsError(try MetricsWriter(jsonl: nil, tensorboardDirectory: blocker.appendingPathComponent("tb"))) { error in
            XCTAssertTrue("\(error)".contains(blocker.path), "\(error)")
        }
    }

    /// `MovingLossAverage(window: steps per epoch)` equals kohya's LossRecorder.moving_average
    /// (Tests/Fixtures/training/loss_average_golden.json, make_tfevents.py).
    func testMovingLossAverageMatchesKohyaLossRecorder() throws {
        struct Golden: Decodable { let steps_per_epoch: Int; let losses: [Double]; let moving_averages: [Double] }
        let golden = try JSONDecoder().decode(
            Golden.self, from: Data(contentsOf: Self.fixtures.appendingPathComponent("loss_average_golden.json")))
        var average = MovingLossAverage(window: golden.steps_per_epoch)
        XCTAssertTrue(average.value.isNaN)
        for (i, (loss, expected)) in zip(golden.losses, golden.moving_averages).enumerated() {
            // kohya keeps a running total, we re-sum: equal to rounding.
            XCTAssertEqual(average.add(loss), expected, accuracy: 1e-14, "step \(i)")
        }
        // A skipped step's NaN is not recorded.
        let before = average.value
        XCTAssertEqual(average.add(.nan), before)
        XCTAssertEqual(average.losses.count, golden.steps_per_epoch)
    }

    // MARK: progress

    /// A clock the test moves by hand.
    final class ManualClock {
        var now = 0.0
        func read() -> Double { now }
    }

    func testTerminalBarRedrawsOneLine() {
        let clock = ManualClock()
        var out: [String] = []
        let progress = TrainingProgress(total: 100, isTerminal: true, columns: 200, clock: clock.read, output: { out.append($0) })
        clock.now = 2.5
        progress.update(step: 1, loss: 0.12346, extra: "lr=1e-04")
        XCTAssertEqual(out, ["\rsteps:   1%|▏                   | 1/100 [00:02<04:07,  2.50s/it, avr_loss=0.1235, lr=1e-04]\u{1B}[K"])
        clock.now = 2.55
        progress.update(step: 2, loss: 0.1)  // within 0.1 s of the last draw: not redrawn
        XCTAssertEqual(out.count, 1)
        clock.now = 25
        progress.update(step: 50, loss: 0.0912)
        XCTAssertEqual(out.last, "\rsteps:  50%|██████████          | 50/100 [00:25<00:25,  2.00it/s, avr_loss=0.0912]\u{1B}[K")
        progress.note("saved out/lora-000050.safetensors")
        XCTAssertEqual(out.last, "\r\u{1B}[Ksaved out/lora-000050.safetensors\n"
            + "steps:  50%|██████████          | 50/100 [00:25<00:25,  2.00it/s, avr_loss=0.0912]")
        clock.now = 7275
        progress.update(step: 100, loss: 0.05)
        XCTAssertEqual(out.last, "\rsteps: 100%|████████████████████| 100/100 [2:01:15<00:00, 72.75s/it, avr_loss=0.05]\u{1B}[K")
        let drawn = out.count
        progress.finish()
        XCTAssertEqual(out.count, drawn + 1)
        XCTAssertEqual(out.last, "\n")
        progress.update(step: 101, loss: 0)
        progress.finish()
        XCTAssertEqual(out.count, drawn + 1, "nothing after finish")
    }

    /// A bar line longer than the terminal narrows its bar, then is cut (a wrapped line cannot be redrawn with \r).
    func testTerminalBarFitsTheWidth() {
        var out: [String] = []
        let clock = ManualClock()
        let progress = TrainingProgress(total: 10, isTerminal: true, columns: 70, clock: clock.read, output: { out.append($0) })
        clock.now = 2
        progress.update(step: 1, loss: 0.5)
        // At most 69 characters: the line with a 20-cell bar is 77, so the bar gets 12 cells.
        XCTAssertEqual(out, ["\rsteps:  10%|█▏" + String(repeating: " ", count: 10) + "| 1/10 [00:02<00:18,  2.00s/it, avr_loss=0.5]\u{1B}[K"])
        progress.update(step: 10, loss: 0.5, extra: String(repeating: "x", count: 100))
        // No bar at all and still too long: cut at 69.
        let expected = "steps: 100%|| 10/10 [00:02<00:00,  5.00it/s, avr_loss=0.5, " + String(repeating: "x", count: 100)
        XCTAssertEqual(out.last, "\r" + String(expected.prefix(69)) + "\u{1B}[K")
    }

    func testPlainLinesEveryNStepsAndLast() {
        let clock = ManualClock()
        var out: [String] = []
        // Resumed at step 20: rate and ETA count only this process's steps.
        let progress = TrainingProgress(total: 35, startStep: 20, isTerminal: false, logEvery: 10, clock: clock.read, output: { out.append($0) })
        for step in 21...33 {
            clock.now = Double(step - 20) * 4
            progress.update(step: step, loss: 0.25)
        }
        XCTAssertEqual(out, [
            "step 21/35 (60%), avr_loss 0.25, 4.00 s/it, elapsed 00:04, eta 00:56\n",
            "step 30/35 (85%), avr_loss 0.25, 4.00 s/it, elapsed 00:40, eta 00:20\n",
        ])
        progress.note("saved x")
        XCTAssertEqual(out.last, "saved x\n")
        // Stopped early (e.g. interrupted) at 33: finish logs the last step seen.
        progress.finish()
        XCTAssertEqual(out.last, "step 33/35 (94%), avr_loss 0.25, 4.00 s/it, elapsed 00:52, eta 00:08\n")
        XCTAssertEqual(out.count, 4)

        var fast: [String] = []
        let p2 = TrainingProgress(total: 4, isTerminal: false, logEvery: 10, clock: clock.read, output: { fast.append($0) })
        clock.now += 1
        for step in 1...4 { p2.update(step: step, loss: .nan, extra: "skipped=1") }
        p2.finish()
        XCTAssertEqual(fast, [
            "step 1/4 (25%), avr_loss nan, 1.00 it/s, elapsed 00:01, eta 00:03, skipped=1\n",
            "step 4/4 (100%), avr_loss nan, 4.00 it/s, elapsed 00:01, eta 00:00, skipped=1\n",
        ])
    }

    func testBarAndIntervalFormats() {
        XCTAssertEqual(TrainingProgress.bar(0, width: 4), "    ")
        XCTAssertEqual(TrainingProgress.bar(1, width: 4), "████")
        XCTAssertEqual(TrainingProgress.bar(0.5 + 1.0 / 32, width: 4), "██▏ ")
        XCTAssertEqual(TrainingProgress.formatInterval(59.9), "00:59")
        XCTAssertEqual(TrainingProgress.formatInterval(3600), "1:00:00")
        XCTAssertEqual(TrainingProgress.formatInterval(.infinity), "?")
        XCTAssertEqual(TrainingProgress.formatRate(nil), "?it/s")
    }

    // MARK: summary

    func testSummaryLines() {
        let summary = TrainingSummary(
            filesWritten: ["out/lora-000500.safetensors", "out/lora.safetensors"], seconds: 5000, images: 2000,
            steps: 1000, ranks: 2, communicationSeconds: 250, skippedSteps: 1)
        XCTAssertEqual(summary.lines(), [
            "trained 1000 steps (2000 images) in 1:23:20 on 2 ranks: 0.40 images/s, 5.00 s/step",
            "skipped 1 step with a non-finite loss or gradient",
            "communication 04:10 (5.0% of the time)",
            "wrote 2 files:",
            "  out/lora-000500.safetensors",
            "  out/lora.safetensors",
        ])
        XCTAssertEqual(TrainingSummary(filesWritten: [], seconds: 2, images: 1, steps: 10).lines(), [
            "trained 10 steps (1 image) in 00:02 on 1 rank: 0.50 images/s, 5.00 steps/s",
            "wrote no files",
        ])
    }

    // Issue 13: the bar is drawn on a real terminal only — not under mpirun (its ranks get a pty whatever mpirun's own
    // stdout is), not in a batch job, not with TERM=dumb or NO_COLOR; LORA_DIST_PROGRESS decides when set.
    func testProgressBarOnlyOnARealTerminal() {
        XCTAssertTrue(TrainingProgress.drawsBar(["TERM": "xterm"], stdoutIsTTY: true))
        XCTAssertFalse(TrainingProgress.drawsBar(["TERM": "xterm"], stdoutIsTTY: false))
        XCTAssertFalse(TrainingProgress.drawsBar(["TERM": "dumb"], stdoutIsTTY: true))
        XCTAssertFalse(TrainingProgress.drawsBar(["TERM": "xterm", "NO_COLOR": "1"], stdoutIsTTY: true))
        XCTAssertFalse(TrainingProgress.drawsBar(["TERM": "xterm", "OMPI_COMM_WORLD_SIZE": "2"], stdoutIsTTY: true))
        XCTAssertFalse(TrainingProgress.drawsBar(["TERM": "xterm", "SLURM_JOB_ID": "7"], stdoutIsTTY: true))
        XCTAssertTrue(TrainingProgress.drawsBar(["TERM": "xterm", "SLURM_JOB_ID": "7", "SLURM_PTY_PORT": "4000"], stdoutIsTTY: true))
        XCTAssertFalse(TrainingProgress.drawsBar(["TERM": "xterm", "PBS_ENVIRONMENT": "PBS_BATCH"], stdoutIsTTY: true))
        XCTAssertTrue(TrainingProgress.drawsBar(["OMPI_COMM_WORLD_SIZE": "2", "LORA_DIST_PROGRESS": "bar"], stdoutIsTTY: false))
        XCTAssertFalse(TrainingProgress.drawsBar(["TERM": "xterm", "LORA_DIST_PROGRESS": "lines"], stdoutIsTTY: true))
    }
}
