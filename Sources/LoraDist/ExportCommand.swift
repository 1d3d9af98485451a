import ArgumentParser
import Foundation
import Training

/// `lora-dist export STATE`: a LoRA file (kohya format, as a step save would be) from a resumable state.
struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write the LoRA file of a training state (a state file, or a run's state folder: its newest readable state).",
        discussion: """
            For a run that was stopped, preempted or failed: its last state becomes a LoRA file that ComfyUI, A1111 and \
            diffusers load, without the model or the config. Example:
              lora-dist export output/my-lora-state --out my-lora-step1200.safetensors
            """)

    @Argument(help: "A state file (state-NNNNNNNN.ldstate) or a state folder (<output_dir>/<output_name>-state).")
    var state: String

    @Option(help: "The LoRA file to write. Default: <output_name>-state-step<N>.safetensors next to the state folder.")
    var out: String?

    @Option(help: "fp16, bf16 or fp32. Default: the run's save_precision.")
    var precision: String?

    func run() throws {
        do {
            let r = try StateExport.export(state: state, to: out, precision: precision)
            print("wrote \(r.path) (step \(r.step), from \(r.state))")
        } catch {
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            throw ExitCode.failure
        }
    }
}
