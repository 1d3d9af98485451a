import Distributed
import XCTest

final class ZstdTests: XCTestCase {
    func testRoundTripAndCompressesRedundantData() throws {
        var rng = SystemRandomNumberGenerator()
        // float-like data: random mantissas, few distinct exponent bytes
        let input = (0..<65536).map { i -> UInt8 in i % 4 == 3 ? 0x3F : UInt8.random(in: 0...255, using: &rng) }
        let packed = try Zstd.compress(input, level: 1)
        XCTAssertLessThan(packed.count, input.count)
        XCTAssertEqual(try Zstd.decompress(packed, size: input.count), input)
    }

    func testCorruptInputIsAnErrorNotACrash() {
        XCTAssertThrowsError(try Zstd.decompress([1, 2, 3, 4, 5], size: 10)) { error in
            XCTAssertTrue("\(error)".contains("zstd decompress failed"), "\(error)")
        }
    }
}
