import Foundation
import XCTest
@testable import Dataset

final class SyntheticShapesTests: XCTestCase {
    private func tempDir() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("shapes-\(UUID().uuidString)")
        addTeardownBlock { try? FileManager.default.removeItem(at: dir) }
        return dir
    }

    private func rgb(named name: String) throws -> (Int, Int, Int) {
        let c = try XCTUnwrap(SyntheticShapes.colours.first { $0.name == name }, "unknown colour \(name)")
        return (Int(c.rgb.0), Int(c.rgb.1), Int(c.rgb.2))
    }

    private func pixel(_ image: DecodedImage, _ x: Int, _ y: Int) -> (Int, Int, Int) {
        let o = (y * image.width + x) * 3
        return (Int(image.rgb[o]), Int(image.rgb[o + 1]), Int(image.rgb[o + 2]))
    }

    private func assertClose(_ a: (Int, Int, Int), _ b: (Int, Int, Int), _ what: String) {
        XCTAssertLessThanOrEqual(max(abs(a.0 - b.0), abs(a.1 - b.1), abs(a.2 - b.2)), 2, "\(what): \(a) vs \(b)")
    }

    func testWritesPairsWhoseCaptionsNameWhatIsDrawn() throws {
        let dir = try tempDir()
        let count = 12
        let paths = try SyntheticShapes.write(to: dir, count: count, seed: 7, scale: 0.125)
        XCTAssertEqual(paths.count, count)
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path)
        XCTAssertEqual(files.filter { $0.hasSuffix(".png") }.count, count)
        XCTAssertEqual(files.filter { $0.hasSuffix(".txt") }.count, count)

        var shapes = Set<String>(), aspects = Set<String>()
        for (index, png) in paths.enumerated() {
            // The PNG really is a PNG: its magic bytes, and libvips decodes it.
            let bytes = try Data(contentsOf: png)
            XCTAssertEqual(Array(bytes.prefix(8)), [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A])
            let (w, h) = try ImageIO.size(of: png.path)
            aspects.insert(w == h ? "square" : (w < h ? "portrait" : "landscape"))
            let image = try ImageIO.load(png.path, resizeTo: (w, h), crop: (0, 0, w, h))

            // Parse the caption from disk and check its words against the pixels.
            let caption = try String(contentsOf: png.deletingPathExtension().appendingPathExtension("txt"), encoding: .utf8)
            let parts = caption.components(separatedBy: ", ")
            XCTAssertEqual(parts.count, 3, caption)
            XCTAssertEqual(parts[0], SyntheticShapes.trigger)
            let shapeWords = parts[1].split(separator: " ").map(String.init)
            XCTAssertEqual(shapeWords.count, 2, caption)
            XCTAssertNotNil(SyntheticShapes.Shape(rawValue: shapeWords[1]), caption)
            XCTAssertTrue(parts[2].hasSuffix(" background"), caption)
            let bgName = String(parts[2].dropLast(" background".count))
            XCTAssertNotEqual(shapeWords[0], bgName)
            shapes.insert(shapeWords[1])

            let drawing = SyntheticShapes.render(index: index, seed: 7, scale: 0.125)
            XCTAssertEqual(drawing.caption, caption)
            XCTAssertEqual(drawing.image.width, w); XCTAssertEqual(drawing.image.height, h)
            let p = drawing.interiorPoint
            assertClose(pixel(image, p.x, p.y), try rgb(named: shapeWords[0]), "\(caption) shape pixel")
            for (x, y) in [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)] {
                assertClose(pixel(image, x, y), try rgb(named: bgName), "\(caption) corner (\(x),\(y))")
            }
            // Anti-aliased: some pixels are neither the shape nor the background colour.
            let fg = try rgb(named: shapeWords[0]), bg = try rgb(named: bgName)
            var mixed = 0
            for y in 0..<h { for x in 0..<w {
                let c = pixel(drawing.image, x, y)
                if c != fg && c != bg { mixed += 1 }
            } }
            XCTAssertGreaterThan(mixed, 0, "\(caption): no edge pixels blended")
        }
        XCTAssertEqual(aspects, ["square", "portrait", "landscape"])
        XCTAssertGreaterThan(shapes.count, 1)
    }

    func testSameSeedSameBytesDifferentSeedDiffers() throws {
        let a = try SyntheticShapes.write(to: try tempDir(), count: 5, seed: 3, scale: 0.125)
        let b = try SyntheticShapes.write(to: try tempDir(), count: 5, seed: 3, scale: 0.125)
        let c = try SyntheticShapes.write(to: try tempDir(), count: 5, seed: 4, scale: 0.125)
        var differs = false
        for i in 0..<5 {
            XCTAssertEqual(try Data(contentsOf: a[i]), try Data(contentsOf: b[i]))
            let ta = a[i].deletingPathExtension().appendingPathExtension("txt")
            let tb = b[i].deletingPathExtension().appendingPathExtension("txt")
            XCTAssertEqual(try Data(contentsOf: ta), try Data(contentsOf: tb))
            if try Data(contentsOf: a[i]) != Data(contentsOf: c[i]) { differs = true }
        }
        XCTAssertTrue(differs, "seed 3 and seed 4 wrote the same images")
    }

    func testSizesAtScaleOneAreMultiplesOf64() throws {
        let dir = try tempDir()
        let paths = try SyntheticShapes.write(to: dir, count: 3, seed: 0, scale: 1)
        var seen: [String] = []
        for png in paths {
            let (w, h) = try ImageIO.size(of: png.path)
            XCTAssertEqual(w % 64, 0); XCTAssertEqual(h % 64, 0)
            XCTAssertGreaterThanOrEqual(w * h, 832 * 1216)
            seen.append("\(w)x\(h)")
        }
        XCTAssertEqual(seen, ["1024x1024", "832x1216", "1216x832"])
        for i in 0..<10 {
            let s = SyntheticShapes.size(index: i, scale: 1)
            XCTAssertEqual(s.width % 64, 0); XCTAssertEqual(s.height % 64, 0)
            let small = SyntheticShapes.size(index: i, scale: 0.25)
            XCTAssertEqual(small.width % 8, 0); XCTAssertEqual(small.height % 8, 0)
        }
    }

    func testRejectsBadArguments() throws {
        XCTAssertThrowsError(try SyntheticShapes.write(to: try tempDir(), count: -1))
        XCTAssertThrowsError(try SyntheticShapes.write(to: try tempDir(), count: 1, scale: 0))
    }
}
