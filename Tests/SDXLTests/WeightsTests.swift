import SDXL
import Tensor
import XCTest

final class WeightsTests: XCTestCase {
    func testStrictLoadingNamesMissingUnexpectedAndMisShapedKeys() {
        let source = TensorDictionary([
            "m.proj.weight": Tensor(zeros: [4, 3]),
            "m.proj.bias": Tensor(zeros: [5]),          // wrong shape
            "m.extra.weight": Tensor(zeros: [2]),       // nobody asks for it
            "other.weight": Tensor(zeros: [1]),         // outside the checked prefix
        ], name: "test.safetensors")
        let binder = WeightBinder(source)
        let root = binder.scope("m")
        _ = LinearLayer(root["proj"], 3, 4)
        _ = GroupNormLayer(root["norm"], channels: 32, eps: 1e-5)
        XCTAssertThrowsError(try binder.finish(checkingUnusedUnder: ["m."])) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains("test.safetensors"), text)
            XCTAssertTrue(text.contains("2 missing key(s)") && text.contains("m.norm.weight") && text.contains("m.norm.bias"), text)
            XCTAssertTrue(text.contains("1 unexpected key(s)") && text.contains("m.extra.weight"), text)
            XCTAssertFalse(text.contains("other.weight"), text)
            XCTAssertTrue(text.contains("m.proj.bias: model wants [4], file has [5]"), text)
        }
    }

    func testRandomWeightsAreDeterministicPerKey() throws {
        let a = RandomWeights(seed: 3), b = RandomWeights(seed: 3), c = RandomWeights(seed: 4)
        let x = try a.tensor("k.weight", expectedShape: [8, 4])!.scalars
        XCTAssertEqual(x, try b.tensor("k.weight", expectedShape: [8, 4])!.scalars)
        XCTAssertNotEqual(x, try c.tensor("k.weight", expectedShape: [8, 4])!.scalars)
        XCTAssertNotEqual(x, try a.tensor("j.weight", expectedShape: [8, 4])!.scalars)
        let norm = try a.tensor("x.norm1.weight", expectedShape: [64])!.scalars
        XCTAssertEqual(norm.reduce(0, +) / 64, 1, accuracy: 0.05)
    }
}
