import Foundation
import SafeTensors
import SDXL
import Tensor
import TestSupport
import XCTest

/// End to end: `mpirun -np 2 lora-dist cache` with a small random checkpoint whose VAE downsamples by 8 (the tiny
/// preset with four VAE levels), over a few PNGs. Both ranks encode disjoint shares that together cover the
/// dataset; a second run is all hits.
final class CacheCommandTests: XCTestCase {
    func binary(_ name: String) throws -> String { try TestProcesses.executable(name) }

    /// A minimal RGB PNG: zlib "stored" blocks (no compression), so no zlib dependency is needed.
    static func png(width: Int, height: Int, pixel: (Int, Int) -> (UInt8, UInt8, UInt8)) -> Data {
        var raw: [UInt8] = []
        for y in 0..<height {
            raw.append(0)
            for x in 0..<width { let p = pixel(x, y); raw += [p.0, p.1, p.2] }
        }
        var z: [UInt8] = [0x78, 0x01]
        var i = 0
        repeat {
            let n = min(65535, raw.count - i)
            let last: UInt8 = i + n == raw.count ? 1 : 0
            z += [last, UInt8(n & 0xff), UInt8(n >> 8), UInt8(~n & 0xff), UInt8((~n >> 8) & 0xff)]
            z += raw[i..<i + n]
            i += n
        } while i < raw.count
        var a: UInt32 = 1, b: UInt32 = 0
        for v in raw { a = (a + UInt32(v)) % 65521; b = (b + a) % 65521 }
        z += be(b << 16 | a)
        func crc(_ d: [UInt8]) -> UInt32 {
            var c: UInt32 = 0xffff_ffff
            for v in d { c ^= UInt32(v); for _ in 0..<8 { c = c & 1 == 1 ? 0xedb8_8320 ^ (c >> 1) : c >> 1 } }
            return ~c
        }
        func be(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8((v >> 16) & 0xff), UInt8((v >> 8) & 0xff), UInt8(v & 0xff)] }
        func chunk(_ type: String, _ d: [UInt8]) -> [UInt8] { be(UInt32(d.count)) + Array(type.utf8) + d + be(crc(Array(type.utf8) + d)) }
        let ihdr = be(UInt32(width)) + be(UInt32(height)) + [8, 2, 0, 0, 0]
        return Data([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a] + chunk("IHDR", ihdr) + chunk("IDAT", z) + chunk("IEND", []))
    }

    /// `mpirun ARGS` (ARGS start with -np).
    func run(_ args: [String]) throws -> (status: Int32, output: String) {
        try TestProcesses.run(try TestProcesses.mpirun(), args)
    }

    func testTwoRanksShareTheWorkThenAllHits() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cache-cmd-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let img = dir.appendingPathComponent("img")
        try FileManager.default.createDirectory(at: img, withIntermediateDirectories: true)
        for (i, (w, h)) in [(256, 256), (320, 192), (192, 320), (264, 256)].enumerated() {
            try Self.png(width: w, height: h) { x, y in (UInt8((x * 7 + i * 40) & 0xff), UInt8(y & 0xff), 128) }
                .write(to: img.appendingPathComponent("i\(i).png"))
        }
        var preset = SDXLPreset.tiny
        preset.vae = VAEConfig(baseChannels: 32, channelMult: [1, 1, 1, 1], resBlocks: 1, zChannels: 4, scalingFactor: 0.13025)
        let model = dir.appendingPathComponent("model.safetensors").path
        try writeSafeTensors(preset.randomWeights(seed: 3, dtype: .f16), metadata: preset.metadata, to: model)
        let cache = dir.appendingPathComponent("cache").path
        let args = ["-np", "2", "--oversubscribe", try binary("lora-dist"), "cache", img.path, "--model", model,
                    "--cache-dir", cache, "--resolution", "256", "--verbose", "--threads", "1"]

        let first = try run(args)
        XCTAssertEqual(first.status, 0, first.output)
        XCTAssertTrue(first.output.contains("4 latents, 0 hits, 4 misses, 0 rebuilt"), first.output)
        // Rank 0's progress counts both ranks' encodes (it used to count its own share only): it reaches 4 of 4.
        XCTAssertTrue(first.output.contains("encoded 4 (all 2 ranks; 4 latents in the plan"), first.output)
        // Each rank lists what it owns: disjoint, and together every file in the cache.
        var owned: [Int: Set<String>] = [:]
        for line in first.output.split(separator: "\n") where line.contains(" owns ") {
            let rank = line.contains("[rank 0/2]") ? 0 : line.contains("[rank 1/2]") ? 1 : -1
            let name = line.components(separatedBy: " owns ")[1].split(separator: " ")[0]
            owned[rank, default: []].insert(String(name))
        }
        XCTAssertEqual(Set(owned.keys), [0, 1], first.output)
        XCTAssertTrue(owned[0, default: []].isDisjoint(with: owned[1, default: []]))
        // Latents go to <cache-dir>/latents, where `lora-dist train` with [lora_dist] cache_dir = <cache-dir> reads them.
        let latents = cache + "/latents"
        let files = Set(try FileManager.default.contentsOfDirectory(atPath: latents).filter { $0.hasSuffix(".safetensors") })
        XCTAssertEqual(files.count, 4)
        XCTAssertEqual(owned[0, default: []].union(owned[1, default: []]), files)
        for f in files {
            let st = try SafeTensorsFile(path: latents + "/" + f)
            XCTAssertEqual(st.entries["mean"]?.dtype, "F32")
            XCTAssertTrue(try st.tensor("mean").scalars.allSatisfy(\.isFinite))
        }

        let second = try run(args)
        XCTAssertEqual(second.status, 0, second.output)
        XCTAssertTrue(second.output.contains("4 latents, 4 hits, 0 misses, 0 rebuilt"), second.output)

        // node_local (issue 14): each rank caches the latents of the images it trains on; together, every one.
        let local = dir.appendingPathComponent("local").path
        var localArgs = args
        localArgs[localArgs.firstIndex(of: cache)!] = local
        let third = try run(localArgs + ["--cache-mode", "node_local"])
        XCTAssertEqual(third.status, 0, third.output)
        XCTAssertTrue(third.output.contains("4 latents, 0 hits, 4 misses, 0 rebuilt") && third.output.contains("cache_mode node_local"), third.output)
        XCTAssertEqual(Set(try FileManager.default.contentsOfDirectory(atPath: local + "/latents").filter { $0.hasSuffix(".safetensors") }).count, 4)
        let bad = try run(args + ["--cache-mode", "everywhere"])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.output.contains("--cache-mode everywhere: give shared or node_local"), bad.output)
    }
}
