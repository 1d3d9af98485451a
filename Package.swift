// swift-tools-version:6.0
import Foundation
import PackageDescription

/// The vector ISA the kernels are compiled for. Swift on Linux targets baseline x86-64 (SSE2, no FMA):
/// the engine's loops then run 4 lanes wide while PyTorch's run 16 (measured: SiLU/GELU 2.5-3.5x slower
/// than PyTorch on baseline, level with it on AVX-512). The build machine's own ISA is used, as
/// `-march=native` would; a build for other machines (a cluster with older nodes) sets
/// LORA_DIST_TARGET_CPU to an LLVM CPU name (`haswell` = AVX2+FMA) or `generic`.
func kernelTargetCPU() -> String? {
    if let forced = ProcessInfo.processInfo.environment["LORA_DIST_TARGET_CPU"] {
        return forced.isEmpty || forced == "generic" ? nil : forced
    }
    #if arch(x86_64)
    guard let cpuinfo = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
          let line = cpuinfo.split(separator: "\n").first(where: { $0.hasPrefix("flags") }) else { return nil }
    let flags = Set(line.split(separator: " ").map(String.init))
    if flags.isSuperset(of: ["avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "fma"]) { return "skylake-avx512" }
    if flags.isSuperset(of: ["avx2", "fma", "f16c"]) { return "haswell" }
    #endif
    return nil
}

// Kernels are optimised (-O) in every configuration: the test suite runs numerics at real sizes
// (attention at N = 4096) and a -Onone kernel is 30-100x slower. Not -Ounchecked: that would also drop
// every precondition, and shape/index checks are how bad input becomes a message instead of corrupt memory.
let kernelFlags: [SwiftSetting] = [
    .unsafeFlags(["-O", "-enforce-exclusivity=unchecked"] + (kernelTargetCPU().map { ["-target-cpu", $0] } ?? [])),
]

let package = Package(
    name: "lora-dist",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "lora-dist", targets: ["LoraDist"]),
        .executable(name: "lora-dist-bench", targets: ["EngineBench"]),
        .executable(name: "lora-dist-unet-bench", targets: ["UNetBench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    ],
    targets: [
        // Thin C shims: each is imported by exactly one Swift file.
        .target(name: "CBLAS", path: "Sources/CBLAS"),
        .systemLibrary(
            name: "CMPI", path: "Sources/CMPI", pkgConfig: "ompi-c",
            providers: [.apt(["libopenmpi-dev", "openmpi-bin"])]),
        .systemLibrary(name: "CVips", path: "Sources/CVips", pkgConfig: "vips", providers: [.apt(["libvips-dev"])]),
        .target(name: "CZstd", path: "Sources/CZstd", linkerSettings: [.linkedLibrary("zstd")]),
        // oneDNN (bf16 GEMMs and convolutions), dlopen'ed like OpenBLAS; only its header is needed to build.
        .target(name: "CDNNL", path: "Sources/CDNNL", cSettings: [.unsafeFlags(["-O2"])],
                linkerSettings: [.linkedLibrary("dl")]),

        // The hash (FNV-1a) and generator (SplitMix64) everything shares.
        .target(name: "Base", path: "Sources/Base"),
        .target(name: "Tensor", dependencies: ["Base", "CBLAS", "CDNNL"], path: "Sources/Tensor", swiftSettings: kernelFlags),
        .target(name: "SafeTensors", dependencies: ["Tensor"], path: "Sources/SafeTensors"),
        .target(
            name: "SDXL", dependencies: ["Base", "Tensor", "SafeTensors"], path: "Sources/SDXL",
            resources: [.copy("Resources/clip_bpe_merges.txt"), .copy("Resources/LICENSE-open_clip.txt")],
            swiftSettings: kernelFlags),
        .target(
            name: "Distributed",
            dependencies: ["Base", "CMPI", "CZstd", .product(name: "Logging", package: "swift-log")],
            path: "Sources/Distributed"),
        .target(
            name: "Dataset", dependencies: ["Base", "CVips", "SafeTensors", "Tensor", .product(name: "TOMLKit", package: "TOMLKit")], path: "Sources/Dataset"),
        // config → dataset/caches → UNet+LoRA step → all-reduce → optimizer → checkpoint, tied together.
        .target(
            name: "Training",
            dependencies: [
                "Base", "Tensor", "SafeTensors", "SDXL", "Distributed", "Dataset",
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            path: "Sources/Training", exclude: ["README.md"], swiftSettings: kernelFlags),
        .executableTarget(
            name: "LoraDist",
            dependencies: [
                "Base", "Tensor", "SafeTensors", "SDXL", "Distributed", "Dataset", "Training",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Sources/LoraDist"),
        .executableTarget(
            name: "EngineBench", dependencies: ["Tensor"], path: "bench/EngineBench",
            swiftSettings: kernelFlags),
        .executableTarget(
            name: "UNetBench", dependencies: ["SDXL", "Tensor", "SafeTensors"], path: "bench/UNetBench",
            swiftSettings: kernelFlags),

        .executableTarget(name: "DataBench", dependencies: ["Dataset", "SDXL", "Tensor", "SafeTensors"], path: "bench/DataBench", swiftSettings: kernelFlags),
        .executableTarget(name: "TrainBench", dependencies: ["Training", "SDXL", "Tensor", "SafeTensors", "Distributed"], path: "bench/TrainBench", swiftSettings: kernelFlags),
        .executableTarget(name: "MPIHarness", dependencies: ["Base", "Distributed"], path: "Tests/MPIHarness"),

        // Spawning the package's executables and mpirun from tests (shared by the test targets that need it).
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        .testTarget(
            name: "TensorTests", dependencies: ["Base", "Tensor", "SafeTensors"], path: "Tests/TensorTests"),
        .testTarget(name: "SDXLTests", dependencies: ["SDXL", "Tensor", "SafeTensors", "TestSupport"], path: "Tests/SDXLTests"),
        .testTarget(name: "DatasetTests", dependencies: ["Base", "Dataset", "SafeTensors", "Tensor"], path: "Tests/DatasetTests"),
        .testTarget(name: "SafeTensorsTests", dependencies: ["SafeTensors"], path: "Tests/SafeTensorsTests"),
        .testTarget(name: "DistributedTests", dependencies: ["Distributed", "TestSupport"], path: "Tests/DistributedTests"),
        .testTarget(
            name: "TrainingTests", dependencies: ["Base", "Training", "SDXL", "Dataset", "Distributed", "Tensor", "SafeTensors", "TestSupport"],
            path: "Tests/TrainingTests"),
    ],
    swiftLanguageModes: [.v5]
)
