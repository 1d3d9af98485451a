import Foundation

/// What a checkpoint is, told from its key names and a few shapes — so that a file of another family is
/// refused by name instead of failing with a thousand missing keys. The rules follow ComfyUI's
/// model_detection.py (`detect_unet_config`, `model_config_from_unet`) and the single-file prefixes.
public enum ModelFamily: Equatable, CustomStringConvertible {
    case sdxl(vPrediction: Bool)
    case sdxlRefiner
    case sd1
    case sd2
    case sd3
    case flux
    case kohyaLoRA
    case unknown(String)

    public var description: String {
        switch self {
        case .sdxl(let v): return v ? "SDXL (v-prediction, e.g. NoobAI-XL V-Pred)" : "SDXL (Illustrious-XL / WAI / NoobAI / Pony family)"
        case .sdxlRefiner: return "SDXL refiner"
        case .sd1: return "Stable Diffusion 1.x"
        case .sd2: return "Stable Diffusion 2.x"
        case .sd3: return "Stable Diffusion 3"
        case .flux: return "FLUX"
        case .kohyaLoRA: return "a kohya-format LoRA (not a base model)"
        case .unknown(let why): return "unknown (\(why))"
        }
    }

    public var isSDXL: Bool { if case .sdxl = self { return true } else { return false } }

    /// Detects the family from key → shape.
    public static func detect(_ shapes: [String: [Int]]) -> ModelFamily {
        let keys = shapes.keys
        func has(_ prefix: String) -> Bool { keys.contains { $0.hasPrefix(prefix) } }
        if has("lora_unet_") || has("lora_te") { return .kohyaLoRA }
        if has("double_blocks.") || has("model.diffusion_model.double_blocks.") { return .flux }
        if has("model.diffusion_model.joint_blocks.") || has("joint_blocks.") { return .sd3 }
        if let label = shapes["model.diffusion_model.label_emb.0.0.weight"], label.count == 2 {
            if label[1] == 2560 || !has("conditioner.embedders.1.") && has("conditioner.embedders.0.model.") { return .sdxlRefiner }
            return .sdxl(vPrediction: shapes["v_pred"] != nil)
        }
        if has("cond_stage_model.model.transformer.") { return .sd2 }
        if has("cond_stage_model.transformer.") { return .sd1 }
        if has("model.diffusion_model.input_blocks.") {
            // A bare UNet: its cross-attention width tells the family (768 SD1, 1024 SD2, 2048 SDXL).
            let ctx = shapes.first { $0.key.hasSuffix("attn2.to_k.weight") }?.value.last
            switch ctx {
            case 2048: return .sdxl(vPrediction: shapes["v_pred"] != nil)
            case 768: return .sd1
            case 1024: return .sd2
            default: break
            }
        }
        return .unknown("no model.diffusion_model / conditioner keys of a known layout")
    }

    /// Throws unless the family is SDXL (what lora-dist trains), naming what it found.
    public static func requireSDXL(_ shapes: [String: [Int]], file: String) throws {
        let family = detect(shapes)
        guard family.isSDXL else {
            throw ModelFamilyError(file: file, family: family)
        }
    }
}

public struct ModelFamilyError: Error, CustomStringConvertible {
    public let file: String
    public let family: ModelFamily
    public var description: String {
        "\(file) is \(family); lora-dist trains SDXL-family models (Illustrious-XL, WAI-illustrious, NoobAI, Pony). Use an SDXL base checkpoint."
    }
}
