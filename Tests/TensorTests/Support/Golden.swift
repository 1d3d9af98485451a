import Foundation
import SafeTensors
import Tensor
import XCTest

/// A golden case written by Tests/Fixtures/make_op_fixtures.py from PyTorch: inputs (`input.<k>`,
/// integer ones as `index.<k>`), the forward result (`output`, or `output.<k>`), the upstream gradient
/// fed to backward (`grad_output`), and each input's gradient (`grad.<k>`). Metadata: `args` (JSON) and
/// `code` (the PyTorch expression that made it).
struct Golden {
    static let folder = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/ops")

    let name: String
    let file: SafeTensorsFile
    let args: [String: Any]

    init(_ name: String) throws {
        self.name = name
        file = try SafeTensorsFile(path: Golden.folder.appendingPathComponent("\(name).safetensors").path)
        let json = file.metadata["args"] ?? "{}"
        args = (try JSONSerialization.jsonObject(with: Data(json.utf8))) as? [String: Any] ?? [:]
    }

    func input(_ k: String) throws -> Tensor { try file.tensor("input.\(k)") }
    func indices(_ k: String) throws -> [Int] { try file.integers("index.\(k)") }
    func output(_ k: String? = nil) throws -> Tensor { try file.tensor(k.map { "output.\($0)" } ?? "output") }
    func gradOutput(_ k: String? = nil) throws -> Tensor { try file.tensor(k.map { "grad_output.\($0)" } ?? "grad_output") }
    func grad(_ k: String) throws -> Tensor { try file.tensor("grad.\(k)") }
    func has(_ tensor: String) -> Bool { file.entries[tensor] != nil }

    func int(_ k: String) -> Int { (args[k] as! NSNumber).intValue }
    func float(_ k: String) -> Float { (args[k] as! NSNumber).floatValue }
    func bool(_ k: String) -> Bool { (args[k] as! NSNumber).boolValue }
    func ints(_ k: String) -> [Int] { (args[k] as! [NSNumber]).map(\.intValue) }
    func string(_ k: String) -> String { args[k] as! String }
}

/// Asserts |a − e| ≤ atol + rtol·|e| elementwise, reporting the worst element.
func assertClose(_ actual: Tensor, _ expected: Tensor, atol: Float, rtol: Float, _ what: String,
                 file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(actual.shape, expected.shape, "\(what): shape", file: file, line: line)
    guard actual.shape == expected.shape else { return }
    let a = actual.scalars, e = expected.scalars
    var worst = 0, worstExcess: Float = -.infinity
    for i in 0..<a.count {
        let excess = abs(a[i] - e[i]) - (atol + rtol * abs(e[i]))
        if !(excess <= worstExcess) || a[i].isNaN { worstExcess = a[i].isNaN ? .infinity : excess; worst = i }
    }
    XCTAssertTrue(a.isEmpty || worstExcess <= 0,
                  "\(what): element \(worst) is \(a.isEmpty ? 0 : a[worst]), expected \(e.isEmpty ? 0 : e[worst]) (atol \(atol), rtol \(rtol))",
                  file: file, line: line)
}

extension Golden {
    /// Runs `f` on the fixture's inputs `names` (each a parameter when the fixture has its gradient),
    /// compares the output, then backpropagates the fixture's grad_output and compares every gradient.
    func check(_ names: [String], atol: Float, rtol: Float, gradAtol: Float? = nil, gradRtol: Float? = nil,
               file: StaticString = #filePath, line: UInt = #line, _ f: (Tape, [Var]) throws -> Var) throws {
        let tape = Tape()
        let vars = try names.map { Var(try input($0), requiresGrad: has("grad.\($0)")) }
        let out = try f(tape, vars)
        assertClose(out.value, try output(), atol: atol, rtol: rtol, "\(name) output", file: file, line: line)
        let grads = tape.backward(from: out, seed: try gradOutput())
        for (k, v) in zip(names, vars) where v.requiresGrad {
            guard let g = grads[v] else { XCTFail("\(name): no gradient for \(k)", file: file, line: line); continue }
            assertClose(g, try grad(k), atol: gradAtol ?? atol, rtol: gradRtol ?? rtol, "\(name) d\(k)", file: file, line: line)
        }
    }
}
