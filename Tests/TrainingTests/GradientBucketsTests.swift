import Base
import Distributed
import Foundation
import SafeTensors
import SDXL
import Tensor
import TestSupport
@testable import Training
import XCTest

/// The overlapped all-reduce's readiness rule (GradientBuckets): a module's gradient is taken as soon as backward has
/// gone back past its first use in the forward pass. Taken too early, later contributions would be missing and the
/// gradient would differ from the one a whole backward gives, so: the gradients through the stream equal, bit for bit,
/// the ones added after backward (one rank: the reduction is the identity), for the UNet and both text encoders
/// (whose modules are used by several tokens' rows), with and without gradient checkpointing (uses inside a
/// checkpointed block are positioned at the block), on top of an accumulated window; and most buckets are handed
/// over while backward still runs.
extension TextEncoderLoRATests {
    func testOverlappedGradientsAreTakenWhenFinal() throws {
        let file = try fixture()
        let encoders = try textEncoders(file)
        let unet = try TrainingFixtures.tinyUNet()
        let net = try LoRANetwork(unet: unet, textEncoders: encoders, contents: try contents(file))
        let latents = try file.tensor("latents"), noise = try file.tensor("noise")
        let timesteps = try file.integers("timesteps")
        let reducer = try GradientAllReduce(communicator: LocalGroup(size: 1).communicator(rank: 0),
                                            count: net.parameterCount, format: .fp32)
        // Small buckets: many of them, so the order of hand-over is exercised.
        let buckets = GradientBuckets(network: net, reducer: reducer, bucketFloats: 300)
        XCTAssertGreaterThan(buckets.buckets.count, 10)
        XCTAssertEqual(buckets.buckets.flatMap(\.modules).sorted(), Array(net.modules.indices))
        // A window's earlier micro-steps already in the buffer.
        var rng = SplitMix64(seed: 7)
        let earlier = (0..<net.parameterCount).map { _ in Float(rng.uniform()) - 0.5 }
        for checkpointing in [false, true] {
            let condition = try squareConditioning(file, encoders, checkpointing: checkpointing)
            func step(_ stream: GradientBuckets.Stream?) -> [Float] {
                var grads = earlier
                _ = TrainingStep.run(unet: unet, network: net, latents: latents, noise: noise,
                                     noisyLatents: schedule.addNoise(latents, noise: noise, timesteps: timesteps),
                                     timesteps: timesteps, conditioning: condition, sampleWeights: [1, 1], schedule: schedule,
                                     loss: LossOptions(minSNRGamma: 5), checkpointing: checkpointing, gradients: &grads,
                                     stream: stream)
                return grads
            }
            let reference = step(nil)
            let stream = GradientBuckets.Stream(buckets)
            var overlapped = step(stream)
            stream.complete(grads: nil, gradients: &overlapped)   // what the loop does after every micro-step: a no-op here
            let outcome = try stream.finish(gradients: &overlapped)
            XCTAssertEqual(overlapped.map(\.bitPattern), reference.map(\.bitPattern), "checkpointing \(checkpointing)")
            XCTAssertNotEqual(reference, earlier)
            XCTAssertGreaterThan(stream.handedOverDuringBackward, buckets.buckets.count / 2, "checkpointing \(checkpointing)")
            XCTAssertEqual(outcome.stats.bytesSent, 0)   // one rank: nothing on the wire
        }
        // An error before any bucket was handed over: abandoning stops the communication thread (it would otherwise
        // wait for bucket 0 forever) and turns the use recording off.
        let dropped = GradientBuckets.Stream(buckets)
        XCTAssertTrue(net.recordingUses)
        dropped.abandon()
        XCTAssertFalse(net.recordingUses)
    }
}
