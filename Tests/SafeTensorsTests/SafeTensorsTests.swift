import Foundation
import SafeTensors
import Tensor
import XCTest

final class SafeTensorsTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("st-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: dir) }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    func testRoundTripAllFloatTypesAndMetadata() throws {
        let a = Tensor(randomNormal: [3, 5], seed: 1)
        let tensors = ["a": a, "h": a.converted(to: .f16), "b": a.converted(to: .bf16)]
        try writeSafeTensors(tensors, metadata: ["ss_network_dim": "16"], to: path("x.safetensors"))
        let f = try SafeTensorsFile(path: path("x.safetensors"))
        XCTAssertEqual(f.names, ["a", "b", "h"])
        XCTAssertEqual(f.metadata["ss_network_dim"], "16")
        for (k, t) in tensors {
            let r = try f.tensor(k)
            XCTAssertEqual(r.dtype, t.dtype)
            XCTAssertEqual(r.shape, [3, 5])
            XCTAssertEqual(r.scalars, t.scalars)
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("x.safetensors") + ".tmp-\(getpid())"))
    }

    /// Writes a file with the given JSON header and `data` bytes after it.
    func raw(_ name: String, header: String, data: [UInt8] = [], declaredLength: UInt64? = nil) -> String {
        var out = Data()
        var n = (declaredLength ?? UInt64(header.utf8.count)).littleEndian
        withUnsafeBytes(of: &n) { out.append(contentsOf: $0) }
        out.append(contentsOf: Array(header.utf8))
        out.append(contentsOf: data)
        FileManager.default.createFile(atPath: path(name), contents: out)
        return path(name)
    }

    func assertRejected(_ p: String, _ fragment: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try SafeTensorsFile(path: p), file: file, line: line) { error in
            XCTAssertTrue("\(error)".contains(fragment), "\(error) should mention '\(fragment)'", file: file, line: line)
            XCTAssertTrue("\(error)".contains(p), "\(error) should name the file", file: file, line: line)
        }
    }

    func testHostileAndTruncatedFilesAreErrors() {
        assertRejected(raw("short", header: "", declaredLength: 0), "not a JSON object")  // 8 bytes, empty header
        let tiny = path("tiny"); FileManager.default.createFile(atPath: tiny, contents: Data([1, 2, 3]))
        assertRejected(tiny, "truncated")
        assertRejected(raw("huge", header: "{}", declaredLength: 1 << 40), "exceeds")
        assertRejected(raw("cut", header: "{}", declaredLength: 500), "truncated")
        assertRejected(raw("notjson", header: "{nope"), "not a JSON object")
        assertRejected(raw("dtype", header: #"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#, data: [0]), "unknown dtype")
        assertRejected(raw("range", header: #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, data: [0, 0, 0, 0]), "outside")
        assertRejected(raw("size", header: #"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, data: [UInt8](repeating: 0, count: 8)), "needs 12 bytes")
        assertRejected(raw("overlap", header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                           data: [UInt8](repeating: 0, count: 8)), "overlap")
        assertRejected(raw("neg", header: #"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, data: [0, 0, 0, 0]), "bad shape")
        let ckpt = path("model.ckpt"); FileManager.default.createFile(atPath: ckpt, contents: Data([0x80, 2]))
        assertRejected(ckpt, "pickle")
        // A PyTorch checkpoint renamed .safetensors is named as one (issue 13): torch.save's zip, a raw pickle.
        let zip = path("renamed-zip.safetensors")
        FileManager.default.createFile(atPath: zip, contents: Data([0x50, 0x4B, 0x03, 0x04] + [UInt8](repeating: 0, count: 60)))
        assertRejected(zip, "PyTorch pickle checkpoint (a torch.save zip archive) with a .safetensors name")
        let pickle = path("renamed-pickle.safetensors")
        FileManager.default.createFile(atPath: pickle, contents: Data([0x80, 0x02, 0x7D, 0x71] + [UInt8](repeating: 0, count: 60)))
        assertRejected(pickle, "a raw pickle")
    }
}
