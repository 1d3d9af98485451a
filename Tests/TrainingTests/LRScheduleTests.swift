import Foundation
import XCTest

@testable import Training

/// LR schedules against transformers.optimization.TYPE_TO_SCHEDULER_FUNCTION (what kohya's get_scheduler_fix
/// calls; same formulas as diffusers.optimization.get_scheduler), called with the keywords kohya passes:
/// lrs recorded by Tests/Fixtures/training/make_optim.py over every step and three past the end.
final class LRScheduleTests: XCTestCase {
    func testSchedulesMatchTransformers() throws {
        for c in OptimFixture.json["schedules"] as! [[String: Any]] {
            let name = c["name"] as! String
            let warmup = c["warmup"] as! Int, total = c["total"] as! Int
            let baseLR = c["base_lr"] as! Double
            let schedule = try LRSchedule(name: name, warmupSteps: warmup, totalSteps: total,
                                          numCycles: c["num_cycles"] as! Int, power: c["power"] as! Double,
                                          baseLearningRate: baseLR)
            for (step, expected) in (c["lrs"] as! [Double]).enumerated() {
                XCTAssertEqual(baseLR * schedule.factor(step: step), expected, accuracy: 1e-12 * baseLR + 1e-9 * expected,
                               "\(name) warmup \(warmup) total \(total) step \(step)")
            }
        }
    }

    /// kohya under accelerate on N processes (make_optim.py "kohya_schedules": LambdaLR stepped N times per
    /// optimizer step, num_training_steps = max_train_steps · N).
    func testKohyaMultiProcessScheduleMatchesAccelerate() throws {
        for c in OptimFixture.json["kohya_schedules"] as! [[String: Any]] {
            let name = c["name"] as! String, processes = c["processes"] as! Int
            let baseLR = c["base_lr"] as! Double
            let schedule = try LRSchedule.kohya(name: name, lrWarmupSteps: c["lr_warmup_steps"] as! Double,
                                                maxTrainSteps: c["max_train_steps"] as! Int, processes: processes)
            for (step, expected) in (c["lrs"] as! [Double]).enumerated() {
                XCTAssertEqual(baseLR * schedule.factor(optimizerStep: step), expected, accuracy: 1e-12 * baseLR,
                               "\(name) on \(processes) processes, optimizer step \(step)")
            }
        }
    }

    func testAdafactorProxyIsConstant() throws {
        let s = try LRSchedule(name: "adafactor:0.001", warmupSteps: 0, totalSteps: 10)
        XCTAssertEqual((0..<12).map { s.factor(step: $0) }, [Double](repeating: 1, count: 12))
    }

    func testErrors() {
        XCTAssertThrowsError(try LRSchedule(name: "cosine_annealing", warmupSteps: 0, totalSteps: 10)) {
            XCTAssertTrue("\($0)".contains("cosine_annealing") && "\($0)".contains("cosine_with_restarts"), "\($0)")
        }
        XCTAssertThrowsError(try LRSchedule(name: "constant", warmupSteps: 5, totalSteps: 10)) {
            XCTAssertTrue("\($0)".contains("constant_with_warmup"), "\($0)")
        }
        XCTAssertThrowsError(try LRSchedule(name: "polynomial", warmupSteps: 0, totalSteps: 10)) {
            XCTAssertTrue("\($0)".contains("baseLearningRate"), "\($0)")
        }
        XCTAssertThrowsError(try LRSchedule(name: "polynomial", warmupSteps: 0, totalSteps: 10, baseLearningRate: 1e-8))
    }

    /// kohya int_or_float + get_scheduler_fix: a value >= 1 is a step count, a float < 1 is int(ratio * total).
    func testWarmupSteps() {
        XCTAssertEqual(LRSchedule.warmupSteps(100, totalSteps: 1000), 100)
        XCTAssertEqual(LRSchedule.warmupSteps(0.05, totalSteps: 1000), 50)
        XCTAssertEqual(LRSchedule.warmupSteps(0.1, totalSteps: 333), 33)
        XCTAssertEqual(LRSchedule.warmupSteps(0, totalSteps: 1000), 0)
    }
}
