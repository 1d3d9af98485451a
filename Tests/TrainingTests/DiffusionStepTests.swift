import Base
import Foundation
import SafeTensors
import Tensor
@testable import Training
import XCTest

/// NoiseSchedule, DiffusionNoise and DiffusionLoss against kohya sd-scripts and diffusers.
///
/// Every expected value comes from Tests/Fixtures/training/make_diffusion.py, which runs kohya's functions
/// (copied verbatim from sd-scripts 48d368fa) and diffusers 0.42.1's DDPMScheduler under torch 2.13.0+cpu, and
/// writes diffusion.safetensors: the schedule tables, the random draws kohya's get_noise_noisy_latents_and_timesteps
/// made (in call order) with its outputs, and kohya's loss + torch-autograd gradient for a grid of loss options.
final class DiffusionStepTests: XCTestCase {
    static let fixturePath = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/training/diffusion.safetensors").path

    var file: SafeTensorsFile!
    var cases: [String: Any]!

    override func setUpWithError() throws {
        file = try SafeTensorsFile(path: Self.fixturePath)
        let json = try XCTUnwrap(file.metadata["cases"], "diffusion.safetensors has no 'cases' metadata; rerun make_diffusion.py")
        cases = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
    }

    /// |a − e| ≤ tol · max(|e|, floor) elementwise; reports the worst element.
    func assertClose(_ actual: [Float], _ expected: [Float], rel: Float, floor: Float = 1e-6, _ what: String,
                     file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(actual.count, expected.count, "\(what): count", file: file, line: line)
        var worst = (index: -1, ratio: Float(0))
        for i in 0..<min(actual.count, expected.count) {
            let ratio = abs(actual[i] - expected[i]) / max(abs(expected[i]), floor)
            if !(ratio <= worst.ratio) { worst = (i, ratio) }
        }
        if worst.index >= 0 && !(worst.ratio <= rel) {
            XCTFail("\(what): element \(worst.index) is \(actual[worst.index]), expected \(expected[worst.index]) (relative error \(worst.ratio) > \(rel))",
                    file: file, line: line)
        }
    }

    // MARK: schedule

    /// alphas_cumprod of diffusers' DDPMScheduler (scaled_linear 0.00085..0.012, 1000 steps), with and without
    /// kohya's zero-terminal-SNR fix, and kohya's all_snr table.
    func testScheduleMatchesDiffusersAndKohya() throws {
        for zts in [false, true] {
            let tag = zts ? "zts" : "base"
            let schedule = NoiseSchedule(zeroTerminalSNR: zts)
            XCTAssertEqual(schedule.trainSteps, 1000)
            // The unfixed table is bit-exact. The zero-terminal fix takes square roots, and torch 2.13's CPU fp32 sqrt
            // is not correctly rounded (1 ulp off for about a fifth of inputs; we use IEEE sqrt); the shift by
            // √ᾱ_999 then magnifies that ulp to a few 1e-6 relative near the end of the table.
            assertClose(schedule.alphasCumprod, try file.tensor("schedule.\(tag).alphas_cumprod").scalars, rel: zts ? 1e-5 : 0,
                        floor: 1e-12, "\(tag) alphas_cumprod")
            assertClose(schedule.allSNR, try file.tensor("schedule.\(tag).all_snr").scalars, rel: 1e-5, floor: 1e-12, "\(tag) all_snr")
            XCTAssertEqual(schedule.snr(999), schedule.allSNR[999])
        }
        XCTAssertEqual(NoiseSchedule(zeroTerminalSNR: true).alphasCumprod[999], 0, "zero terminal SNR ends at ᾱ = 0")
    }

    // MARK: noise

    /// Replays the numbers kohya drew, checking that they are asked for in kohya's order and shapes.
    struct ReplayedDraws: NoiseDrawSource {
        var draws: [[String: Any]]
        let file: SafeTensorsFile
        var failures: [String] = []

        mutating func next(_ kind: String) -> [String: Any]? {
            guard let first = draws.first else { failures.append("asked for a \(kind) draw after kohya's last one"); return nil }
            draws.removeFirst()
            if first["kind"] as? String != kind { failures.append("asked for \(kind), kohya drew \(first["kind"] ?? "?")") }
            return first
        }

        mutating func normal(_ shape: [Int]) -> Tensor {
            guard let d = next("normal"), let name = d["tensor"] as? String, let t = try? file.tensor(name) else {
                return Tensor(zeros: shape)
            }
            if t.shape != shape { failures.append("normal draw \(name) is \(t.shape), asked for \(shape)"); return Tensor(zeros: shape) }
            return t
        }

        mutating func uniform() -> Double {
            (next("uniform")?["value"] as? Double) ?? 0
        }

        mutating func timesteps(count: Int, in range: Range<Int>) -> [Int] {
            let values = (next("timesteps")?["values"] as? [Int]) ?? []
            if values.count != count || !values.allSatisfy(range.contains) {
                failures.append("kohya's timesteps \(values) are not \(count) values in \(range)")
            }
            return values
        }
    }

    /// kohya get_noise_noisy_latents_and_timesteps for noise offset (fixed, random strength, adaptive incl. the clamp),
    /// multires pyramid noise (with the early stop at 1 row/column), ip noise (fixed and random strength),
    /// timestep ranges and a fixed timestep, replayed with kohya's own draws; and diffusers get_velocity on the result.
    func testNoiseMatchesKohyaGivenItsDraws() throws {
        let latents = try file.tensor("noise.latents")
        let noiseCases = try XCTUnwrap(cases["noise_cases"] as? [[String: Any]])
        XCTAssertEqual(noiseCases.count, 9)
        for c in noiseCases {
            let name = try XCTUnwrap(c["name"] as? String)
            let args = try XCTUnwrap(c["args"] as? [String: Any])
            let options = NoiseOptions(
                noiseOffset: args["noise_offset"] as? Double,
                noiseOffsetRandomStrength: args["noise_offset_random_strength"] as? Bool ?? false,
                adaptiveNoiseScale: args["adaptive_noise_scale"] as? Double,
                multiresNoiseIterations: args["multires_noise_iterations"] as? Int,
                multiresNoiseDiscount: args["multires_noise_discount"] as? Double ?? 0.3,
                ipNoiseGamma: args["ip_noise_gamma"] as? Double,
                ipNoiseGammaRandomStrength: args["ip_noise_gamma_random_strength"] as? Bool ?? false,
                minTimestep: args["min_timestep"] as? Int, maxTimestep: args["max_timestep"] as? Int)
            XCTAssertNoThrow(try options.validate(), name)
            let schedule = NoiseSchedule(zeroTerminalSNR: args["zero_terminal_snr"] as? Bool ?? false)
            var replay = ReplayedDraws(draws: try XCTUnwrap(c["draws"] as? [[String: Any]]), file: file)
            let batch = DiffusionNoise.sample(latents: latents, schedule: schedule, options: options, draws: &replay)
            XCTAssertEqual(replay.failures, [], name)
            XCTAssertEqual(replay.draws.count, 0, "\(name): kohya drew \(replay.draws.count) numbers that were not used")
            XCTAssertEqual(batch.timesteps, try XCTUnwrap(args["expected_timesteps"] as? [Int]), name)
            // noisy latents and v are differences of O(1) terms, so elements near 0 carry a few fp32 ulps of those
            // terms: the floor makes that an absolute 5e-7.
            assertClose(batch.noise.scalars, try file.tensor("noise.\(name).noise").scalars, rel: 1e-5, floor: 0.05, "\(name) noise")
            assertClose(batch.noisyLatents.scalars, try file.tensor("noise.\(name).noisy").scalars, rel: 1e-5, floor: 0.05, "\(name) noisy latents")
            let velocity = schedule.target(latents: latents, noise: batch.noise, timesteps: batch.timesteps, vPrediction: true)
            XCTAssertEqual(schedule.target(latents: latents, noise: batch.noise, timesteps: batch.timesteps, vPrediction: false).scalars,
                           batch.noise.scalars, "\(name): the ε target is the noise")
            assertClose(velocity.scalars, try file.tensor("noise.\(name).velocity").scalars, rel: 1e-5, floor: 0.05, "\(name) velocity")
        }
    }

    /// Our own generator: timesteps stay in [min, max) and reach both ends, min == max pins them, and noise is
    /// standard normal.
    func testTimestepBoundsAndNoiseStatistics() throws {
        let schedule = NoiseSchedule()
        let latents = Tensor(zeros: [64, 4, 8, 8])
        var rng = SplitMix64(seed: 7)
        var seen = Set<Int>()
        for _ in 0..<40 {
            let batch = DiffusionNoise.sample(latents: latents, schedule: schedule,
                                              options: NoiseOptions(minTimestep: 990, maxTimestep: 1000), rng: &rng)
            XCTAssertTrue(batch.timesteps.allSatisfy { (990..<1000).contains($0) }, "\(batch.timesteps)")
            seen.formUnion(batch.timesteps)
        }
        XCTAssertEqual(seen, Set(990..<1000), "every timestep of the range is drawn")

        var all = [Int]()
        for _ in 0..<20 {
            let batch = DiffusionNoise.sample(latents: latents, schedule: schedule, options: NoiseOptions(), rng: &rng)
            all += batch.timesteps
        }
        XCTAssertTrue(all.allSatisfy { (0..<1000).contains($0) })
        let mean = Double(all.reduce(0, +)) / Double(all.count)
        XCTAssertEqual(mean, 499.5, accuracy: 30, "default timesteps are uniform on 0..<1000 (1280 draws)")

        let pinned = DiffusionNoise.sample(latents: latents, schedule: schedule,
                                           options: NoiseOptions(minTimestep: 300, maxTimestep: 300), rng: &rng)
        XCTAssertEqual(pinned.timesteps, [Int](repeating: 300, count: 64), "min == max gives every sample max (kohya get_timesteps)")
        let noise = pinned.noise.scalars.map(Double.init)
        let m = noise.reduce(0, +) / Double(noise.count)
        let v = noise.map { ($0 - m) * ($0 - m) }.reduce(0, +) / Double(noise.count)
        XCTAssertEqual(m, 0, accuracy: 0.03)
        XCTAssertEqual(v, 1, accuracy: 0.05)
        // With zero latents the UNet input is √(1 − ᾱ_300) · noise.
        let s = Float((1 - Double(schedule.alphasCumprod[300])).squareRoot())
        assertClose(pinned.noisyLatents.scalars, pinned.noise.scalars.map { $0 * s }, rel: 1e-6, floor: 1e-3, "noisy latents of zero latents")
    }

    /// A seed gives the same step every time; another seed does not.
    func testSamplingIsDeterministicPerSeed() {
        let latents = Tensor(randomNormal: [2, 4, 16, 16], seed: 3)
        let options = NoiseOptions(noiseOffset: 0.05, noiseOffsetRandomStrength: true, adaptiveNoiseScale: 0.01,
                                   multiresNoiseIterations: 4, ipNoiseGamma: 0.1, ipNoiseGammaRandomStrength: true)
        func run(_ seed: UInt64) -> NoisedBatch {
            var rng = SplitMix64(seed: seed)
            return DiffusionNoise.sample(latents: latents, schedule: NoiseSchedule(), options: options, rng: &rng)
        }
        let a = run(11), b = run(11), c = run(12)
        XCTAssertEqual(a.noise.scalars, b.noise.scalars)
        XCTAssertEqual(a.noisyLatents.scalars, b.noisyLatents.scalars)
        XCTAssertEqual(a.timesteps, b.timesteps)
        XCTAssertNotEqual(a.noise.scalars, c.noise.scalars)
    }

    func testInvalidNoiseOptionsAreRejected() {
        func problem(_ o: NoiseOptions) -> String? {
            do { try o.validate(); return nil } catch { return "\(error)" }
        }
        XCTAssertNil(problem(NoiseOptions()))
        XCTAssertNil(problem(NoiseOptions(minTimestep: 500, maxTimestep: 500)))
        XCTAssertTrue(problem(NoiseOptions(minTimestep: 600, maxTimestep: 500))?.hasPrefix("min_timestep") ?? false)
        XCTAssertTrue(problem(NoiseOptions(maxTimestep: 1001))?.hasPrefix("max_timestep") ?? false)
        XCTAssertTrue(problem(NoiseOptions(minTimestep: 1000, maxTimestep: 1000))?.hasPrefix("min_timestep") ?? false)
        XCTAssertTrue(problem(NoiseOptions(adaptiveNoiseScale: 0.1))?.hasPrefix("adaptive_noise_scale") ?? false)
        XCTAssertThrowsError(try LossType(kohyaName: "mse"))
        XCTAssertEqual(try LossType(kohyaName: "smooth_l1"), .smoothL1)
        XCTAssertThrowsError(try LossOptions(type: .huber, huberC: 0).validate())
        XCTAssertThrowsError(try LossOptions(minSNRGamma: -1).validate())
    }

    // MARK: loss

    /// kohya's loss (process_batch tail + post_process_loss) and torch autograd's dLoss/dPrediction for
    /// {l2, l1, huber, smooth_l1} × {ε, v} × {no min-SNR, γ = 1.5, γ = 5} × {debiased or not}, the constant and
    /// exponential huber schedules, huber with zero terminal SNR, scale_v_pred_loss_like_noise_pred and
    /// v_pred_like_loss. Timesteps 0, 517 and 999; sample weights 1, 0.5, 1.
    func testLossAndGradientMatchKohya() throws {
        let prediction = try file.tensor("loss.prediction"), target = try file.tensor("loss.target")
        let timesteps = try XCTUnwrap(cases["loss_timesteps"] as? [Int])
        let weights = try file.tensor("loss.sample_weights").scalars
        let lossCases = try XCTUnwrap(cases["loss_cases"] as? [[String: Any]])
        XCTAssertEqual(lossCases.count, 59)
        for (i, c) in lossCases.enumerated() {
            let options = LossOptions(
                type: try LossType(kohyaName: c["loss_type"] as? String ?? "l2"),
                huberSchedule: try HuberSchedule(kohyaName: c["huber_schedule"] as? String ?? "snr"),
                huberC: c["huber_c"] as? Double ?? 0.1, huberScale: c["huber_scale"] as? Double ?? 1.0,
                minSNRGamma: c["min_snr_gamma"] as? Double, vPrediction: c["v_parameterization"] as? Bool ?? false,
                scaleVPredLossLikeNoisePred: c["scale_v_pred_loss_like_noise_pred"] as? Bool ?? false,
                vPredLikeLoss: c["v_pred_like_loss"] as? Double,
                debiasedEstimation: c["debiased_estimation_loss"] as? Bool ?? false)
            XCTAssertNoThrow(try options.validate())
            let schedule = NoiseSchedule(zeroTerminalSNR: c["zero_terminal_snr"] as? Bool ?? false)
            let result = DiffusionLoss.evaluate(prediction: prediction, target: target, timesteps: timesteps,
                                                sampleWeights: weights, schedule: schedule, options: options)
            let what = "case \(i) \(c)"
            assertClose([result.loss], try file.tensor("loss.\(i).loss").scalars, rel: 1e-5, what + " loss")
            assertClose(result.perSample, try file.tensor("loss.\(i).per_sample").scalars, rel: 1e-5, what + " per-sample")
            let expectedGradient = try file.tensor("loss.\(i).gradient").scalars
            let largest = expectedGradient.map(abs).max() ?? 0
            // Relative to each element, with a floor at 1e-4 of the largest so tiny entries are compared absolutely.
            assertClose(result.gradient.scalars, expectedGradient, rel: 1e-5, floor: largest * 1e-4, what + " gradient")
            XCTAssertEqual(result.gradient.shape, prediction.shape)
        }
    }

    /// The gradient is the derivative of the returned loss (central differences in double on a small batch), so the
    /// seed handed to the UNet's backward is consistent with the reported loss for every loss type.
    func testGradientIsDerivativeOfLoss() {
        let prediction = Tensor(randomNormal: [2, 1, 2, 2], seed: 21), target = Tensor(randomNormal: [2, 1, 2, 2], seed: 22)
        let schedule = NoiseSchedule()
        for type in LossType.allCases {
            let options = LossOptions(type: type, huberC: 0.5, minSNRGamma: 5, vPrediction: true, debiasedEstimation: true)
            let base = DiffusionLoss.evaluate(prediction: prediction, target: target, timesteps: [100, 700],
                                              sampleWeights: [1, 0.25], schedule: schedule, options: options)
            var values = prediction.scalars
            for i in values.indices {
                let original = values[i], h: Float = 1e-2
                values[i] = original + h
                let up = DiffusionLoss.evaluate(prediction: Tensor(shape: prediction.shape, values), target: target, timesteps: [100, 700],
                                                sampleWeights: [1, 0.25], schedule: schedule, options: options).loss
                values[i] = original - h
                let down = DiffusionLoss.evaluate(prediction: Tensor(shape: prediction.shape, values), target: target, timesteps: [100, 700],
                                                  sampleWeights: [1, 0.25], schedule: schedule, options: options).loss
                values[i] = original
                XCTAssertEqual(Double(base.gradient.scalars[i]), (Double(up) - Double(down)) / Double(2 * h),
                               accuracy: 2e-3 * Double(abs(base.gradient.scalars[i])) + 1e-5, "\(type) element \(i)")
            }
        }
    }
}
