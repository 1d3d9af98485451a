import SDXL
import XCTest

/// Family detection on key layouts as the single-file checkpoints of each family carry them.
final class ModelFamilyTests: XCTestCase {
    let sdxl: [String: [Int]] = [
        "model.diffusion_model.label_emb.0.0.weight": [1280, 2816],
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [640, 2048],
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
        "conditioner.embedders.1.model.token_embedding.weight": [49408, 1280],
        "first_stage_model.encoder.conv_in.weight": [128, 3, 3, 3],
    ]

    func testSDXLAndItsVariants() {
        XCTAssertEqual(ModelFamily.detect(sdxl), .sdxl(vPrediction: false))
        var vpred = sdxl; vpred["v_pred"] = []
        XCTAssertEqual(ModelFamily.detect(vpred), .sdxl(vPrediction: true))
        let refiner: [String: [Int]] = [
            "model.diffusion_model.label_emb.0.0.weight": [1536, 2560],
            "conditioner.embedders.0.model.token_embedding.weight": [49408, 1280],
        ]
        XCTAssertEqual(ModelFamily.detect(refiner), .sdxlRefiner)
        XCTAssertNoThrow(try ModelFamily.requireSDXL(sdxl, file: "illustrious.safetensors"))
    }

    func testOtherFamiliesAreRefusedByName() {
        let sd15: [String: [Int]] = [
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
        ]
        let sd2: [String: [Int]] = [
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 1024],
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": [3072, 1024],
        ]
        let flux: [String: [Int]] = ["double_blocks.0.img_attn.qkv.weight": [9216, 3072]]
        let lora: [String: [Int]] = ["lora_unet_input_blocks_4_1_proj_in.lora_down.weight": [16, 640]]
        XCTAssertEqual(ModelFamily.detect(sd15), .sd1)
        XCTAssertEqual(ModelFamily.detect(sd2), .sd2)
        XCTAssertEqual(ModelFamily.detect(flux), .flux)
        XCTAssertEqual(ModelFamily.detect(lora), .kohyaLoRA)
        for (shapes, name) in [(sd15, "Stable Diffusion 1.x"), (sd2, "Stable Diffusion 2.x"), (flux, "FLUX")] {
            XCTAssertThrowsError(try ModelFamily.requireSDXL(shapes, file: "m.safetensors")) { error in
                XCTAssertTrue("\(error)".contains("m.safetensors is \(name)"), "\(error)")
            }
        }
    }
}
