import Foundation
import SafeTensors
import SDXL
import Tensor
import TestSupport
@testable import Training
import XCTest

/// Text-encoder LoRA against kohya's code in PyTorch: te_step.safetensors is made by
/// Tests/Fixtures/training/make_te_step.py (kohya LoRAModule wrappers on transformers' CLIP towers and the diffusers
/// UNet, kohya's get_hidden_states_sdxl/pool_workaround conditioning, torch autograd, torch.optim.AdamW with kohya's
/// text-encoder and UNet parameter groups).
final class TextEncoderLoRATests: XCTestCase {
    let schedule = NoiseSchedule()
    static let configL = CLIPTextConfig(vocab: 512, width: 8, layers: 3, heads: 2, projection: nil)
    static let configG = CLIPTextConfig(vocab: 512, width: 16, layers: 3, heads: 2, projection: 16)

    func fixture() throws -> SafeTensorsFile { try SafeTensorsFile(path: TrainingFixtures.path("te_step.safetensors")) }

    func textEncoders(_ file: SafeTensorsFile) throws -> (CLIPTextEncoderL, OpenCLIPTextEncoderG) {
        let binder = WeightBinder(file)
        let l = CLIPTextEncoderL(binder.scope(CLIPTextEncoderL.keyPrefix), config: Self.configL)
        let g = OpenCLIPTextEncoderG(binder.scope(OpenCLIPTextEncoderG.keyPrefix), config: Self.configG)
        try binder.finish(checkingUnusedUnder: [CLIPTextEncoderL.keyPrefix + ".", OpenCLIPTextEncoderG.keyPrefix + "."])
        return (l, g)
    }

    /// The fixture's initial LoRA (UNet, te1, te2 modules).
    func contents(_ file: SafeTensorsFile) throws -> LoRAFile.Contents {
        var modules: [String: (down: Tensor, up: Tensor, alpha: Float?)] = [:]
        for name in file.names where name.hasPrefix("lora_") && name.hasSuffix(".lora_down.weight") {
            let module = String(name.dropLast(".lora_down.weight".count))
            modules[module] = (try file.tensor(name).fp32(), try file.tensor(module + ".lora_up.weight").fp32(),
                               try file.tensor(module + ".alpha").fp32().scalars[0])
        }
        return LoRAFile.Contents(path: file.path, metadata: file.metadata, modules: modules)
    }

    func relErr(_ a: [Float], _ b: [Float]) -> Float {
        let scale = max(b.map(abs).max() ?? 0, 1e-12)
        return zip(a, b).map { abs($0 - $1) }.max()! / scale
    }

    /// kohya's conditioning on the step's tape: both encoders on the fixture's ids, y from pooled + sizes.
    func conditioning(_ file: SafeTensorsFile, _ encoders: (CLIPTextEncoderL, OpenCLIPTextEncoderG))
        throws -> (Tape) -> (context: Var, y: Var) {
        let ids1 = try file.integers("ids1"), ids2 = try file.integers("ids2"), sizes = try file.integers("sizes")
        let rows = { (ids: [Int]) in (0..<2).map { [Array(ids[$0 * 77..<($0 + 1) * 77])] } }
        let s = (0..<2).map { Array(sizes[$0 * 6..<($0 + 1) * 6]) }
        return { t in
            let (context, pooled) = Conditioning.encode(t, l: encoders.0, g: encoders.1, idsL: rows(ids1), idsG: rows(ids2))
            let y = Conditioning.y(t, pooled: pooled, originalSize: s.map { ($0[0], $0[1]) }, cropTopLeft: s.map { ($0[2], $0[3]) },
                                   targetSize: s.map { ($0[4], $0[5]) }, embedDim: 8)
            return (context, y)
        }
    }

    func step(_ net: LoRANetwork, unet: UNet, file: SafeTensorsFile, noise: Tensor, timesteps: [Int],
              conditioning: (Tape) -> (context: Var, y: Var)) throws -> (Float, [Float]) {
        let latents = try file.tensor("latents")
        var grads = [Float](repeating: 0, count: net.parameterCount)
        let (loss, _) = TrainingStep.run(unet: unet, network: net, latents: latents, noise: noise,
                                         noisyLatents: schedule.addNoise(latents, noise: noise, timesteps: timesteps),
                                         timesteps: timesteps, conditioning: conditioning, sampleWeights: [1, 1],
                                         schedule: schedule, loss: LossOptions(minSNRGamma: 5), checkpointing: false,
                                         gradients: &grads)
        return (loss, grads.map { $0 / Float(timesteps.count) })
    }

    // kohya networks/lora.py on SDXL's text encoders: 6 modules per layer (q/k/v/out_proj, fc1, fc2), named in
    // transformers' tree; bigG's q/k/v are slices of the single-file fused in_proj.
    func testModulesAreKohyasNames() throws {
        let encoders = try textEncoders(try fixture())
        let net = try LoRANetwork(unet: nil, textEncoders: encoders, spec: LoRASpec(linearRank: 4, linearAlpha: 2), seed: 1)
        XCTAssertEqual(net.modules.count, 36)
        let q = try XCTUnwrap(net.module(named: "lora_te2_text_model_encoder_layers_1_self_attn_q_proj"))
        XCTAssertEqual(q.path, "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj")
        XCTAssertEqual([q.part, q.parts], [0, 3])
        XCTAssertEqual(q.downShape, [4, 16]); XCTAssertEqual(q.upShape, [16, 4])
        XCTAssertEqual(net.module(named: "lora_te2_text_model_encoder_layers_1_self_attn_v_proj")?.part, 2)
        XCTAssertEqual(net.module(named: "lora_te2_text_model_encoder_layers_0_mlp_fc1")?.path,
                       "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc")
        XCTAssertEqual(net.module(named: "lora_te1_text_model_encoder_layers_2_self_attn_out_proj")?.path,
                       "conditioner.embedders.0.transformer.text_model.encoder.layers.2.self_attn.out_proj")
        XCTAssertEqual(net.models, [.textEncoder1, .textEncoder2])
    }

    // Full SDXL size: 264 text-encoder modules (CLIP-L 12 × 6, bigG 32 × 6), as kohya creates.
    func testSDXLHas264TextEncoderModules() throws {
        let binder = WeightBinder(SharedZeroWeights(byteCount: 512 << 20))
        let l = CLIPTextEncoderL(binder.scope(CLIPTextEncoderL.keyPrefix), config: .clipL)
        let g = OpenCLIPTextEncoderG(binder.scope(OpenCLIPTextEncoderG.keyPrefix), config: .bigG)
        let net = try LoRANetwork(unet: nil, textEncoders: (l, g), spec: LoRASpec(linearRank: 1, linearAlpha: 1), seed: 1)
        XCTAssertEqual(net.modules.filter { $0.model == .textEncoder1 }.count, 72)
        XCTAssertEqual(net.modules.filter { $0.model == .textEncoder2 }.count, 192)
    }

    // One step: conditioning, loss and every te1/te2 LoRA gradient (and the UNet's cross-attention ones) within 1e-4.
    func testOneStepWithTextEncodersMatchesKohya() throws {
        let file = try fixture()
        let encoders = try textEncoders(file)
        let unet = try TrainingFixtures.tinyUNet()
        let net = try LoRANetwork(unet: unet, textEncoders: encoders, contents: try contents(file))
        XCTAssertEqual(net.modules.filter { $0.model != .unet }.count, 36)
        let condition = try conditioning(file, encoders)
        // The conditioning itself (frozen LoRA applied): context and y as kohya's get_hidden_states_sdxl gives them.
        net.bind(trainable: false)
        let (context, y) = condition(Tape(recording: false, adapters: net))
        XCTAssertLessThan(relErr(context.value.scalars, try file.tensor("context").scalars), 1e-5)
        XCTAssertLessThan(relErr(y.value.scalars, try file.tensor("y").scalars), 1e-5)

        let (loss, grads) = try step(net, unet: unet, file: file, noise: try file.tensor("noise"),
                                     timesteps: try file.integers("timesteps"), conditioning: condition)
        let expected = try file.tensor("loss").scalars[0]
        XCTAssertEqual(loss, expected, accuracy: 1e-4 * expected)
        let unetChecked = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(file.metadata["unet_grad_modules"]!.utf8)) as? [String])
        var checked = 0
        for m in net.modules where m.model != .unet || unetChecked.contains(m.name) {
            for (name, offset, count) in [(m.downName, m.downOffset, m.downShape.reduce(1, *)), (m.upName, m.upOffset, m.upShape.reduce(1, *))] {
                let want = try file.tensor("grad." + name).scalars
                let got = Array(grads[offset..<offset + count])
                if want.allSatisfy({ $0 == 0 }) {
                    // te1's last layer: kohya trains it, but SDXL reads the penultimate state, so its gradient is 0.
                    XCTAssertTrue(got.allSatisfy { $0 == 0 }, name)
                } else {
                    XCTAssertLessThan(relErr(got, want), 1e-4, name)
                }
                checked += 1
            }
        }
        XCTAssertEqual(checked, 2 * (36 + unetChecked.count))
    }

    // Gradient checkpointing covers the text encoders: each layer recomputed in backward gives the same loss and the
    // same text-encoder gradients as keeping every activation.
    func testCheckpointedTextEncodersGiveTheSameGradients() throws {
        let file = try fixture()
        let encoders = try textEncoders(file)
        let unet = try TrainingFixtures.tinyUNet()
        let net = try LoRANetwork(unet: unet, textEncoders: encoders, contents: try contents(file))
        var results: [(Float, [Float])] = []
        for checkpointing in [false, true] {
            let condition = try squareConditioning(file, encoders, checkpointing: checkpointing)
            results.append(try step(net, unet: unet, file: file, noise: try file.tensor("noise"),
                                    timesteps: try file.integers("timesteps"), conditioning: condition))
        }
        XCTAssertEqual(results[0].0, results[1].0, accuracy: 1e-6 * abs(results[0].0))
        for m in net.modules where m.model != .unet {
            let range = m.downOffset..<(m.upOffset + m.upShape.reduce(1, *))
            let a = Array(results[0].1[range]), b = Array(results[1].1[range])
            XCTAssertLessThanOrEqual(relErr(b, a), 1e-5, m.name)
        }
    }

    /// Both encoders on the fixture's ids (checkpointed or not), y for two 1024² samples without crops.
    func squareConditioning(_ file: SafeTensorsFile, _ encoders: (CLIPTextEncoderL, OpenCLIPTextEncoderG),
                            checkpointing: Bool) throws -> (Tape) -> (context: Var, y: Var) {
        let ids1 = try file.integers("ids1"), ids2 = try file.integers("ids2")
        let rows = { (ids: [Int]) in (0..<2).map { [Array(ids[$0 * 77..<($0 + 1) * 77])] } }
        return { t in
            let (context, pooled) = Conditioning.encode(t, l: encoders.0, g: encoders.1, idsL: rows(ids1), idsG: rows(ids2),
                                                        checkpointing: checkpointing)
            let sizes = [(1024, 1024), (1024, 1024)]
            return (context, Conditioning.y(t, pooled: pooled, originalSize: sizes, cropTopLeft: [(0, 0), (0, 0)],
                                            targetSize: sizes, embedDim: 8))
        }
    }

    // Ten AdamW steps with kohya's two learning-rate groups (text encoders 2e-3, UNet 5e-4): losses and the text
    // encoders' final weights.
    func testTenAdamWStepsWithTwoLearningRatesMatchKohya() throws {
        let file = try fixture()
        let encoders = try textEncoders(file)
        let unet = try TrainingFixtures.tinyUNet()
        let net = try LoRANetwork(unet: unet, textEncoders: encoders, contents: try contents(file))
        let layout = net.parameterLayout
        XCTAssertEqual(layout.groupNames, ["unet", "te1", "te2"])
        let optimizer = try Optimizers.make(type: "AdamW", args: ["weight_decay=0.01"], layout: layout)
        let condition = try conditioning(file, encoders)
        let noises = try file.tensor("adamw.noise_steps").scalars
        let allTimesteps = try file.integers("adamw.timesteps_steps")
        let per = 2 * 4 * 16 * 16
        var losses: [Float] = []
        for k in 0..<10 {
            let noise = Tensor(shape: [2, 4, 16, 16], Array(noises[k * per..<(k + 1) * per]))
            let (loss, grads) = try step(net, unet: unet, file: file, noise: noise, timesteps: Array(allTimesteps[2 * k..<2 * k + 2]),
                                         conditioning: condition)
            losses.append(loss)
            optimizer.step(parameters: &net.parameters, gradients: grads, learningRates: [5e-4, 2e-3, 2e-3])
        }
        let expected = try file.tensor("adamw.losses").scalars
        XCTAssertLessThan(relErr(losses, expected), 1e-4, "losses \(losses) vs \(expected)")
        // As in ConformanceTests: Adam's per-element normalisation makes 1e-3 of the largest weight the bound.
        for m in net.modules where m.model != .unet {
            let down = Array(net.parameters[m.downOffset..<m.upOffset])
            XCTAssertLessThan(relErr(down, try file.tensor("adamw.final." + m.downName).scalars), 1e-3, m.name)
            let up = Array(net.parameters[m.upOffset..<m.upOffset + m.upShape.reduce(1, *)])
            XCTAssertLessThan(relErr(up, try file.tensor("adamw.final." + m.upName).scalars), 1e-3, m.name)
        }
    }

    // A LoRA file with text-encoder modules, written by lora-dist, loads in diffusers (StableDiffusionXLPipeline's
    // kohya loader + peft: every module applied where kohya means it, no key unused), and the conditioning lora-dist
    // computes with the file read back (the `eval text --lora` path: LoRAFile.read → the network's adapters on the
    // text encoders) equals diffusers' (check_diffusers_te_lora.py). Runs where PyTorch + diffusers + peft exist.
    func testTextEncoderLoRAWeWriteLoadsInDiffusers() throws {
        let probe = try TestProcesses.run("/usr/bin/env", ["python3", "-c", "import torch, diffusers, peft, transformers"])
        guard probe.status == 0 else { throw XCTSkip("PyTorch + diffusers + peft not installed: \(probe.output.suffix(200))") }
        let file = try fixture()
        let encoders = try textEncoders(file)
        let trained = try LoRANetwork(unet: nil, textEncoders: encoders, contents: try contents(file))
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("te-diffusers-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let lora = dir.appendingPathComponent("te.safetensors").path
        try LoRAFile.save(trained, to: lora, dtype: .f16, metadata: ["ss_network_module": "networks.lora", "ss_network_dim": "4",
                                                                     "ss_base_model_version": "sdxl_base_v1-0"])
        let read = try LoRAFile.read(lora)
        XCTAssertEqual(read.modules(of: .textEncoder1).count, 18)
        XCTAssertEqual(read.modules(of: .textEncoder2).count, 18)
        let net = try LoRANetwork(unet: nil, textEncoders: encoders, contents: read)
        let (context, y) = try conditioning(file, encoders)(Tape(recording: false, adapters: net))
        let pooled = Tape(recording: false).slice(y, axis: 1, start: 0, length: 16).value
        let out = dir.appendingPathComponent("ours.safetensors").path
        try writeSafeTensors(["context": context.value, "pooled": pooled], metadata: [:], to: out)
        let check = try TestProcesses.run("/usr/bin/env", ["python3", TrainingFixtures.path("check_diffusers_te_lora.py"),
                                                           "--lora", lora, "--compare", out])
        XCTAssertEqual(check.status, 0, check.output)
        XCTAssertTrue(check.output.contains("diffusers loaded 36 text-encoder modules into exactly those modules"), check.output)
    }
}
