// swift-tools-version:6.0
import PackageDescription

// Kernels are compiled with -Ounchecked in every configuration: the test suite runs numerics at
// real sizes (attention at N = 4096) and a -Onone kernel is 30-100x slower.
let kernelFlags: [SwiftSetting] = [.unsafeFlags(["-Ounchecked", "-enforce-exclusivity=unchecked"])]

let package = Package(
    name: "lora-dist",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "lora-dist", targets: ["LoraDist"]),
        .executable(name: "lora-dist-bench", targets: ["EngineBench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        // Thin C shims: each is imported by exactly one Swift file.
        .target(name: "CBLAS", path: "Sources/CBLAS"),
        .systemLibrary(
            name: "CMPI", path: "Sources/CMPI", pkgConfig: "ompi-c",
            providers: [.apt(["libopenmpi-dev", "openmpi-bin"])]),
        .target(name: "CZstd", path: "Sources/CZstd", linkerSettings: [.linkedLibrary("zstd")]),

        .target(name: "Tensor", dependencies: ["CBLAS"], path: "Sources/Tensor", swiftSettings: kernelFlags),
        .target(name: "SafeTensors", dependencies: ["Tensor"], path: "Sources/SafeTensors"),
        .target(
            name: "Distributed",
            dependencies: ["CMPI", "CZstd", .product(name: "Logging", package: "swift-log")],
            path: "Sources/Distributed"),
        .executableTarget(
            name: "LoraDist",
            dependencies: [
                "Tensor", "SafeTensors", "Distributed",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Sources/LoraDist"),
        .executableTarget(
            name: "EngineBench", dependencies: ["Tensor"], path: "bench/EngineBench",
            swiftSettings: kernelFlags),

        .testTarget(
            name: "TensorTests", dependencies: ["Tensor", "SafeTensors"], path: "Tests/TensorTests"),
        .testTarget(name: "SafeTensorsTests", dependencies: ["SafeTensors"], path: "Tests/SafeTensorsTests"),
        .testTarget(name: "DistributedTests", dependencies: ["Distributed"], path: "Tests/DistributedTests"),
    ],
    swiftLanguageModes: [.v5]
)
