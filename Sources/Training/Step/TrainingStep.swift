import SDXL
import Tensor

/// The text encoders + UNet + LoRA step on one batch: conditioning, forward, kohya's loss, backward — one tape.
public enum TrainingStep {
    /// latents x0, noise ε, noisy latents x_t [B, 4, h, w]; timesteps B; `conditioning` puts context [B, T, 2048] and
    /// y [B, adm] on the step's tape (through the text encoders when their LoRA trains). The target is ε, or
    /// v = √ᾱ·ε − √(1−ᾱ)·x0 with `loss.vPrediction`. Adds Σ over samples of each sample's loss gradient (B × the
    /// gradient of the batch-mean loss) to `gradients` (the network's flat layout) unless the loss is not finite.
    public static func run(unet: UNet, network: LoRANetwork, latents x0: Tensor, noise: Tensor, noisyLatents: Tensor,
                           timesteps: [Int], conditioning: (Tape) -> (context: Var, y: Var), sampleWeights: [Float],
                           schedule: NoiseSchedule, loss options: LossOptions, checkpointing: Bool, gradients: inout [Float])
        -> (loss: Float, perSample: [Float]) {
        run(unet: unet, network: network, latents: x0, noise: noise, noisyLatents: noisyLatents, timesteps: timesteps,
            conditioning: conditioning, sampleWeights: sampleWeights, schedule: schedule, loss: options,
            checkpointing: checkpointing, gradients: &gradients, stream: nil)
    }

    /// `stream`: the overlapped all-reduce of this optimizer step (GradientBuckets), which takes each module's gradient
    /// as soon as backward has finished it; nil: all gradients are added after backward.
    static func run(unet: UNet, network: LoRANetwork, latents x0: Tensor, noise: Tensor, noisyLatents: Tensor,
                    timesteps: [Int], conditioning: (Tape) -> (context: Var, y: Var), sampleWeights: [Float],
                    schedule: NoiseSchedule, loss options: LossOptions, checkpointing: Bool, gradients: inout [Float],
                    stream: GradientBuckets.Stream?) -> (loss: Float, perSample: [Float]) {
        let b = timesteps.count
        let target = options.vPrediction ? schedule.velocity(x0, noise: noise, timesteps: timesteps) : noise
        network.bind(trainable: true)
        let tape = Tape(adapters: network)
        let (context, y) = conditioning(tape)
        let prediction = unet(tape, x: Var(noisyLatents), timesteps: Var(Tensor(shape: [b], timesteps.map(Float.init))),
                              context: context, y: y, checkpointing: checkpointing)
        stream?.forwardDone()
        let loss = DiffusionLoss.evaluate(prediction: prediction.value, target: target, timesteps: timesteps,
                                          sampleWeights: sampleWeights, schedule: schedule, options: options)
        guard loss.loss.isFinite else { return (loss.loss, loss.perSample) }
        // d(Σ per-sample losses)/d(prediction) = B · d(batch mean)/d(prediction).
        let grads = tape.backward(from: prediction, seed: Elementwise.scale(loss.gradient, Float(b))) { remaining, g in
            stream?.progress(remaining: remaining, grads: g, gradients: &gradients)
        }
        if let stream { stream.complete(grads: grads, gradients: &gradients) } else { network.accumulateGradients(grads, into: &gradients) }
        return (loss.loss, loss.perSample)
    }

    /// The step on given conditioning tensors (frozen text encoders).
    public static func run(unet: UNet, network: LoRANetwork, latents x0: Tensor, noise: Tensor, noisyLatents: Tensor,
                           timesteps: [Int], context: Tensor, y: Tensor, sampleWeights: [Float], schedule: NoiseSchedule,
                           loss options: LossOptions, checkpointing: Bool, gradients: inout [Float])
        -> (loss: Float, perSample: [Float]) {
        run(unet: unet, network: network, latents: x0, noise: noise, noisyLatents: noisyLatents, timesteps: timesteps,
            conditioning: { _ in (Var(context), Var(y)) }, sampleWeights: sampleWeights, schedule: schedule, loss: options,
            checkpointing: checkpointing, gradients: &gradients)
    }
}

extension TrainingStep {
    /// The step on an assembled batch: the text conditioner encodes its captions on the step's tape, y adds kohya's
    /// size conditioning. Returns (Σ per-sample losses, samples); adds Σ per-sample gradients into `gradients`.
    static func run(_ batch: TrainingBatch, unet: UNet, network: LoRANetwork, text: TextConditioner, sizeEmbedDim: Int,
                    schedule: NoiseSchedule, loss options: LossOptions, checkpointing: Bool,
                    gradients: inout [Float], stream: GradientBuckets.Stream? = nil) -> (lossSum: Double, samples: Int) {
        let conditioning: (Tape) -> (context: Var, y: Var) = { t in
            let (context, pooled) = text.encode(t, batch.captions, checkpointing: checkpointing)
            return (context, batch.y(t, pooled: pooled, embedDim: sizeEmbedDim))
        }
        let (loss, _) = run(unet: unet, network: network, latents: batch.latents, noise: batch.noise,
                            noisyLatents: batch.noisyLatents, timesteps: batch.timesteps, conditioning: conditioning,
                            sampleWeights: batch.weights, schedule: schedule, loss: options, checkpointing: checkpointing,
                            gradients: &gradients, stream: stream)
        return (loss.isFinite ? Double(loss) * Double(batch.count) : .nan, batch.count)
    }
}

extension TrainingBatch {
    /// SDXL's y for this batch: pooled [B, P] ⊕ the embeddings of each sample's (original size, crop, target size).
    func y(_ t: Tape, pooled: Var, embedDim: Int) -> Var {
        Conditioning.y(t, pooled: pooled, originalSize: sizes.map { ($0.originalHeight, $0.originalWidth) },
                       cropTopLeft: sizes.map { ($0.cropTop, $0.cropLeft) },
                       targetSize: sizes.map { ($0.targetHeight, $0.targetWidth) }, embedDim: embedDim)
    }
}
