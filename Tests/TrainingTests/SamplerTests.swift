import Foundation
import XCTest
@testable import Training

/// The samplers against diffusers' schedulers. Fixture: Tests/Fixtures/sampling/samplers.json, made by
/// Tests/Fixtures/sampling/make_samplers.py (diffusers 0.42 schedulers from SDXL's scheduler config; see there for the
/// synthetic model that stands in for the UNet in the loop cases).
final class SamplerTests: XCTestCase {
    struct Case: Decodable {
        let sampler: String, steps: Int, karras: Bool, prediction: String, zero_snr: Bool, spacing: String
        let timesteps: [Double], init_noise_sigma: Double, sigmas: [Double]?
        let noise: [Float], step_noise: [[Float]], final: [Float]
        var name: String { "\(sampler)\(karras ? " karras" : "") \(steps) steps \(prediction)\(zero_snr ? " zsnr" : "") \(spacing)" }
    }
    struct Fixture: Decodable { let cases: [Case] }

    static let fixture: Fixture = {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../Fixtures/sampling/samplers.json")
        return try! JSONDecoder().decode(Fixture.self, from: Data(contentsOf: url))
    }()

    func sampler(_ c: Case) throws -> Sampler {
        try Sampler(SamplerChoice(kind: SamplerKind(rawValue: c.sampler)!, karras: c.karras), steps: c.steps,
                    prediction: PredictionType(rawValue: c.prediction)!, zeroTerminalSNR: c.zero_snr,
                    spacing: TimestepSpacing(rawValue: c.spacing)!)
    }

    func testSchedulesEqualDiffusers() throws {
        XCTAssertGreaterThan(Self.fixture.cases.count, 30)
        for c in Self.fixture.cases {
            let s = try sampler(c)
            XCTAssertEqual(s.timesteps.count, c.timesteps.count, c.name)
            for (a, b) in zip(s.timesteps, c.timesteps) { XCTAssertEqual(Double(a), b, accuracy: 1e-4 * max(1, abs(b)), "\(c.name) timesteps") }
            if let sigmas = c.sigmas {
                XCTAssertEqual(s.sigmas.count, sigmas.count, c.name)
                // diffusers keeps σ in float32: equal to fp32 rounding (a few ulps with zero terminal SNR, where
                // NoiseSchedule's port of kohya's rescale and diffusers' rescale_zero_terminal_snr round differently).
                let tolerance = c.zero_snr ? 2e-6 : 2e-7
                for (a, b) in zip(s.sigmas, sigmas) { XCTAssertEqual(Double(a), b, accuracy: tolerance * max(1, abs(b)), "\(c.name) sigmas") }
            }
            XCTAssertEqual(Double(s.initNoiseSigma), c.init_noise_sigma, accuracy: 1e-6 * c.init_noise_sigma, "\(c.name) init_noise_sigma")
        }
    }

    /// The synthetic model of make_samplers.py: 0.5 · x[j] + sin(j) · t / 1000.
    func model(_ x: [Float], _ t: Float) -> [Float] {
        x.enumerated().map { j, v in 0.5 * v + Float(sin(Double(Float(j)))) * (t / 1000) }
    }

    func testLoopsEndOnDiffusersLatents() throws {
        for c in Self.fixture.cases {
            var s = try sampler(c)
            var latents = c.noise.map { $0 * s.initNoiseSigma }
            for i in 0..<s.steps {
                let out = model(s.scaleInput(latents, step: i), s.timesteps[i])
                latents = s.step(out, step: i, sample: latents, noise: s.needsStepNoise ? c.step_noise[i] : nil)
            }
            let scale = c.final.map(abs).max()!
            let worst = zip(latents, c.final).map { abs($0 - $1) }.max()!
            // fp32 rounding only; with zero terminal SNR, trailing spacing starts at σ = 4096 and amplifies the schedule's ulps.
            XCTAssertLessThanOrEqual(worst, (c.zero_snr ? 1e-4 : 1e-5) * max(1, scale), "\(c.name): final latents differ by \(worst) (scale \(scale))")
        }
    }

    func testNamesAndRefusals() throws {
        XCTAssertEqual(try SamplerChoice(parsing: "Euler a"), try SamplerChoice(kind: .eulerAncestral))
        XCTAssertEqual(try SamplerChoice(parsing: "k_euler_a"), try SamplerChoice(kind: .eulerAncestral))
        XCTAssertEqual(try SamplerChoice(parsing: "DPM++ 2M Karras"), try SamplerChoice(kind: .dpmpp2m, karras: true))
        XCTAssertEqual(try SamplerChoice(parsing: "dpmpp_2m_karras"), try SamplerChoice(kind: .dpmpp2m, karras: true))
        XCTAssertEqual(try SamplerChoice(parsing: "dpmsolver++"), try SamplerChoice(kind: .dpmpp2m))
        XCTAssertEqual(try SamplerChoice(parsing: "DDIM"), try SamplerChoice(kind: .ddim))
        XCTAssertThrowsError(try SamplerChoice(parsing: "heun")) { XCTAssertTrue("\($0)".contains("kohya's heun is not implemented"), "\($0)") }
        XCTAssertThrowsError(try SamplerChoice(parsing: "ddim_karras")) { XCTAssertTrue("\($0)".contains("unknown sampler"), "\($0)") }
        XCTAssertThrowsError(try SamplerChoice(kind: .eulerAncestral, karras: true)) { XCTAssertTrue("\($0)".contains("no Karras"), "\($0)") }
        XCTAssertThrowsError(try Sampler(SamplerChoice(kind: .euler), steps: 0))
    }
}
