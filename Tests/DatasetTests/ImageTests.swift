import Foundation
import XCTest

@testable import Dataset

/// ImageIO (libvips) against tiny committed images made by Tests/Fixtures/dataset/make_images.py (Pillow),
/// each covering one decoding path, and bad inputs made here.
final class ImageTests: XCTestCase {
    static let images = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/dataset/images")
    func path(_ name: String) -> String { Self.images.appendingPathComponent(name).path }

    /// Decode at the image's own size, no crop.
    func full(_ name: String) throws -> DecodedImage {
        let (w, h) = try ImageIO.size(of: path(name))
        return try ImageIO.load(path(name), resizeTo: (w, h), crop: (0, 0, w, h))
    }
    func pixel(_ image: DecodedImage, _ x: Int, _ y: Int) -> [Int] {
        let i = (y * image.width + x) * 3
        return image.rgb[i..<i + 3].map(Int.init)
    }
    func assertNear(_ a: [Int], _ b: [Int], _ tolerance: Int, _ message: String = "", line: UInt = #line) {
        XCTAssertEqual(a.count, b.count, line: line)
        for (x, y) in zip(a, b) where abs(x - y) > tolerance {
            XCTFail("\(a) vs \(b) beyond ±\(tolerance) \(message)", line: line); return
        }
    }

    func testRGB8ExactPixels() throws {
        let image = try full("rgb8.png")
        XCTAssertEqual(image.width, 12); XCTAssertEqual(image.height, 8)
        for y in 0..<8 { for x in 0..<12 { XCTAssertEqual(pixel(image, x, y), [10 * x, 20 * y, 100]) } }
    }

    func testSixteenBitBecomesEightBit() throws {
        // Samples are 257 * v: a proper 16 → 8-bit conversion gives exactly v (a wrong one gives v/256 or 255).
        let rgb = try full("rgb16.png")
        XCTAssertEqual(rgb.width, 12); XCTAssertEqual(rgb.height, 8)
        for y in 0..<8 { for x in 0..<12 { XCTAssertEqual(pixel(rgb, x, y), [10 * x, 20 * y, 255]) } }
        let grey = try full("grey16.png")
        for x in 0..<12 { XCTAssertEqual(pixel(grey, x, 3), [20 * x, 20 * x, 20 * x]) }
    }

    func testPaletteAndGrey() throws {
        let palette = try full("palette.png")
        XCTAssertEqual(pixel(palette, 0, 0), [200, 30, 40])
        XCTAssertEqual(pixel(palette, 11, 7), [10, 220, 90])
        let grey = try full("grey.png")
        for x in 0..<12 { XCTAssertEqual(pixel(grey, x, 5), [20 * x, 20 * x, 20 * x]) }
    }

    func testTransparentBecomesWhite() throws {
        let rgba = try full("rgba.png")
        XCTAssertEqual(pixel(rgba, 0, 0), [255, 255, 255], "transparent red must composite to white")
        XCTAssertEqual(pixel(rgba, 11, 7), [0, 0, 255])
        let greyAlpha = try full("greyalpha.png")
        XCTAssertEqual(pixel(greyAlpha, 2, 2), [255, 255, 255])
        XCTAssertEqual(pixel(greyAlpha, 9, 2), [60, 60, 60])
    }

    func testJPEGOrientationApplied() throws {
        // Stored 24x16 with EXIF orientation 6: displayed (and bucketed) 16x24, top half red, bottom half blue.
        let size = try ImageIO.size(of: path("exif6.jpg"))
        XCTAssertEqual(size.width, 16); XCTAssertEqual(size.height, 24)
        let image = try full("exif6.jpg")
        XCTAssertEqual(image.width, 16); XCTAssertEqual(image.height, 24)
        assertNear(pixel(image, 8, 2), [255, 0, 0], 12, "top should be red")
        assertNear(pixel(image, 8, 21), [0, 0, 255], 12, "bottom should be blue")
    }

    func testWebP() throws {
        let image = try full("rgb.webp")
        XCTAssertEqual(image.width, 12); XCTAssertEqual(image.height, 8)
        for y in 0..<8 { for x in 0..<12 { XCTAssertEqual(pixel(image, x, y), [10 * x, 20 * y, 50]) } }
    }

    func testResizeCropFlipGiveBucket() throws {
        // A 64x48 image resized to 40x30 and centre-cropped to a 32x30 bucket (crop left 4).
        let full = try ImageIO.load(path("gradient.png"), resizeTo: (40, 30), crop: (0, 0, 40, 30))
        let cropped = try ImageIO.load(path("gradient.png"), resizeTo: (40, 30), crop: (4, 0, 32, 30))
        XCTAssertEqual(cropped.width, 32); XCTAssertEqual(cropped.height, 30)
        XCTAssertEqual(cropped.rgb.count, 32 * 30 * 3)
        for y in [0, 15, 29] { for x in [0, 10, 31] { XCTAssertEqual(pixel(cropped, x, y), pixel(full, x + 4, y)) } }
        let flipped = try ImageIO.load(path("gradient.png"), resizeTo: (40, 30), crop: (4, 0, 32, 30), flip: true)
        for y in [0, 29] { for x in [0, 5, 31] { XCTAssertEqual(pixel(flipped, x, y), pixel(cropped, 31 - x, y)) } }
        // Upscale works too (no_upscale off buckets can scale up).
        let up = try ImageIO.load(path("rgb8.png"), resizeTo: (48, 32), crop: (8, 0, 32, 32))
        XCTAssertEqual(up.width, 32); XCTAssertEqual(up.height, 32)
    }

    func testLanczosMatchesPillowOnSmoothGradient() throws {
        // kohya resizes with PIL/cv2 Lanczos; libvips's Lanczos3 (vips_resize) differs slightly in its kernel
        // support and edge handling, so a smooth gradient is compared with a tolerance of a few levels.
        let ours = try ImageIO.load(path("gradient.png"), resizeTo: (32, 24), crop: (0, 0, 32, 24))
        let pil = try full("gradient_pil_lanczos_32x24.png")
        XCTAssertEqual(pil.width, 32); XCTAssertEqual(pil.height, 24)
        var worst = 0
        for (a, b) in zip(ours.rgb, pil.rgb) { worst = max(worst, abs(Int(a) - Int(b))) }
        XCTAssertLessThanOrEqual(worst, 3, "libvips vs Pillow Lanczos: max difference \(worst) levels")
        // And the resize really is a resize: not equal to nearest-neighbour sampling everywhere.
        XCTAssertNotEqual(ours.rgb, [UInt8](repeating: ours.rgb[0], count: ours.rgb.count))
    }

    func testLargeDownscale() throws {
        // A 1600x1200 smooth gradient written through writePNG, reduced 25x to 64x48 (the path vips_thumbnail
        // takes for huge images): each output pixel is the mean of its 25x25 block, so it must sit on the
        // gradient at the block centre.
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("imagetests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let (w, h) = (1600, 1200)
        var rgb = [UInt8](repeating: 128, count: w * h * 3)
        for y in 0..<h { for x in 0..<w {
            rgb[(y * w + x) * 3] = UInt8((Double(x) * 255 / Double(w - 1)).rounded())
            rgb[(y * w + x) * 3 + 1] = UInt8((Double(y) * 255 / Double(h - 1)).rounded())
        } }
        let file = dir.appendingPathComponent("big.png").path
        try ImageIO.writePNG(rgb, width: w, height: h, to: file)
        let small = try ImageIO.load(file, resizeTo: (64, 48), crop: (0, 0, 64, 48))
        for j in [0, 20, 47] { for i in [0, 31, 63] {
            let r = (Double(i) + 0.5) * 25 - 0.5, g = (Double(j) + 0.5) * 25 - 0.5
            assertNear(pixel(small, i, j), [Int((r * 255 / 1599).rounded()), Int((g * 255 / 1199).rounded()), 128], 2, "at \(i),\(j)")
        } }
    }

    func testChwFloats() {
        let image = DecodedImage(width: 2, height: 1, rgb: [0, 255, 51, 255, 0, 102])
        let chw = image.chwFloats()
        XCTAssertEqual(chw.count, 6)
        XCTAssertEqual(chw[0], -1); XCTAssertEqual(chw[1], 1)           // R plane
        XCTAssertEqual(chw[2], 1); XCTAssertEqual(chw[3], -1)           // G plane
        XCTAssertEqual(chw[4], 51 / 255 * 2 - 1, accuracy: 1e-6)        // B plane
        XCTAssertEqual(chw[5], 102 / 255 * 2 - 1, accuracy: 1e-6)
    }

    func testWritePNGRoundTrip() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("imagetests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let file = dir.appendingPathComponent("w.png").path
        let rgb = (0..<(5 * 3 * 3)).map { UInt8(($0 * 37) % 256) }
        try ImageIO.writePNG(rgb, width: 5, height: 3, to: file)
        let size = try ImageIO.size(of: file)
        XCTAssertEqual(size.width, 5); XCTAssertEqual(size.height, 3)
        XCTAssertEqual(try ImageIO.load(file, resizeTo: (5, 3), crop: (0, 0, 5, 3)).rgb, rgb)
        XCTAssertThrowsError(try ImageIO.writePNG([1, 2], width: 5, height: 3, to: file))
    }

    func testBadInputsNameTheFile() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("imagetests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let empty = dir.appendingPathComponent("empty.png").path
        FileManager.default.createFile(atPath: empty, contents: Data())
        let text = dir.appendingPathComponent("notes.png").path
        try "this is not an image\n".write(toFile: text, atomically: true, encoding: .utf8)
        let good = try Data(contentsOf: Self.images.appendingPathComponent("gradient.png"))
        let truncated = dir.appendingPathComponent("truncated.png").path
        FileManager.default.createFile(atPath: truncated, contents: good.prefix(good.count / 2))
        let missing = dir.appendingPathComponent("missing.png").path

        for bad in [empty, text, truncated, missing] {
            XCTAssertThrowsError(try ImageIO.load(bad, resizeTo: (32, 24), crop: (0, 0, 32, 24)), bad) { error in
                let message = "\(error)"
                XCTAssertTrue(message.contains(bad), "error must name the file: \(message)")
                XCTAssertGreaterThan(message.count, bad.count + 10, "error must give a reason: \(message)")
            }
        }
        for bad in [empty, text, missing] {
            XCTAssertThrowsError(try ImageIO.size(of: bad)) { XCTAssertTrue("\($0)".contains(bad)) }
        }
        // A crop outside the resized image is refused before decoding.
        XCTAssertThrowsError(try ImageIO.load(path("rgb8.png"), resizeTo: (12, 8), crop: (4, 0, 12, 8)))
    }
}
